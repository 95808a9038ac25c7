//! (to be written)
use anyhow::Result;

use crate::Options;
use crate::report::Measurement;

pub fn run(_opts: &Options) -> Result<Vec<Measurement>> {
    Ok(Vec::new())
}
