//! The programs are the `lb` binary target (`src/main.rs`); this library target exists so that
//! lb-userspace can name this crate as a build dependency and be rebuilt when it changes.
#![no_std]
