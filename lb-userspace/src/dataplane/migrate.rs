//! Carrying a pinned map's contents into a new map of a larger layout (more entries, a longer
//! value) across the swap of the programs: every entry is copied before the new programs run,
//! then what the old programs wrote in the meantime is caught up.
//!
//! Values are zero-extended: a field appended to a value starts at zero, as in a fresh entry.
//! The catch-up relies on what the data plane writes: new entries in hashes (flows), and
//! additions to array entries (counters, round-robin cursors). Everything else in the maps is
//! written by userspace under the instance lock, which the upgrade holds.
use std::{collections::HashSet, os::fd::AsFd as _};

use anyhow::{Context as _, Result, anyhow};
use aya::{maps::MapData, util::nr_cpus};

use crate::{dataplane::layout::Layout, dataplane::map_ops};

/// A map being migrated: the old one, still used by the old programs until the swap, and the
/// new one, already filled.
pub struct Migration {
    pub name: &'static str,
    old: MapData,
    new: MapData,
    from: Layout,
    to: Layout,
    cpus: usize,
    copied: Copied,
}

/// What the first copy read, for the catch-up to tell what changed since.
enum Copied {
    /// Every key of a hash.
    Keys(HashSet<Vec<u8>>),
    /// Every value of an array, index after index (`from.value_len` bytes each).
    Values(Vec<u8>),
}

impl Migration {
    /// Copies every entry of `old` (laid out as `from`) into `new` (laid out as `to`, empty),
    /// each value zero-extended.
    pub fn copy(
        name: &'static str,
        old: MapData,
        new: MapData,
        from: Layout,
        to: Layout,
    ) -> Result<Self> {
        let cpus = nr_cpus().map_err(|(what, err)| anyhow!("{what}: {err}"))?;
        let old_len = from.value_len(cpus);
        let mut copied = if from.is_array() {
            Copied::Values(vec![0; from.max_entries as usize * old_len])
        } else {
            Copied::Keys(HashSet::new())
        };
        let mut result = Ok(());
        map_ops::for_each_raw(
            old.fd().as_fd(),
            from.key_size as usize,
            old_len,
            |key, value| {
                match &mut copied {
                    Copied::Keys(keys) => {
                        keys.insert(key.to_vec());
                    }
                    Copied::Values(values) => {
                        values[array_slot(key, old_len)].copy_from_slice(value);
                        // A new array is zeroed already.
                        if value.iter().all(|b| *b == 0) {
                            return;
                        }
                    }
                }
                if result.is_ok() {
                    result =
                        map_ops::update(new.fd().as_fd(), key, &widen(value, &from, &to, cpus));
                }
            },
        )
        .with_context(|| format!("reading {name} to migrate it"))?;
        result.with_context(|| format!("copying {name} into its new layout"))?;
        Ok(Self {
            name,
            old,
            new,
            from,
            to,
            cpus,
            copied,
        })
    }

    /// After the swap: copies the entries the old programs added to a hash since [`copy`], or
    /// adds what they added to an array's entries (as 8-byte counters) to the new map's.
    /// Returns how many entries it wrote.
    ///
    /// [`copy`]: Migration::copy
    pub fn catch_up(self) -> Result<usize> {
        let old_len = self.from.value_len(self.cpus);
        let mut current = vec![0u8; self.to.value_len(self.cpus)];
        let mut written = 0;
        let mut result = Ok(());
        map_ops::for_each_raw(
            self.old.fd().as_fd(),
            self.from.key_size as usize,
            old_len,
            |key, now| {
                if result.is_err() {
                    return;
                }
                let value = match &self.copied {
                    Copied::Keys(keys) if keys.contains(key) => return,
                    Copied::Keys(_) => widen(now, &self.from, &self.to, self.cpus),
                    Copied::Values(values) => {
                        let then = &values[array_slot(key, old_len)];
                        if then == now {
                            return;
                        }
                        match map_ops::lookup(self.new.fd().as_fd(), key, &mut current) {
                            Ok(_) => {}
                            Err(err) => {
                                result = Err(err);
                                return;
                            }
                        }
                        self.add_difference(&mut current, then, now);
                        current.clone()
                    }
                };
                written += 1;
                result = map_ops::update(self.new.fd().as_fd(), key, &value);
            },
        )
        .with_context(|| format!("reading {} again after the swap", self.name))?;
        result.with_context(|| format!("catching up {} in its new layout", self.name))?;
        Ok(written)
    }

    /// `current += now - then`, 8 bytes at a time over each CPU's old value; the bytes of an
    /// old value beyond its last full 8 bytes are taken from `now`.
    fn add_difference(&self, current: &mut [u8], then: &[u8], now: &[u8]) {
        let size = self.from.value_size as usize;
        for (old_at, new_at) in chunk_starts(&self.from, &self.to, self.cpus) {
            let lanes = size / 8;
            for lane in 0..lanes {
                let word = |bytes: &[u8]| {
                    let at = old_at + lane * 8;
                    u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
                };
                let at = new_at + lane * 8;
                let sum = u64::from_ne_bytes(current[at..at + 8].try_into().expect("8 bytes"))
                    .wrapping_add(word(now).wrapping_sub(word(then)));
                current[at..at + 8].copy_from_slice(&sum.to_ne_bytes());
            }
            let tail = lanes * 8..size;
            current[new_at + tail.start..new_at + tail.end]
                .copy_from_slice(&now[old_at + tail.start..old_at + tail.end]);
        }
    }
}

/// Where an array entry's value sits in `Copied::Values`.
fn array_slot(key: &[u8], value_len: usize) -> std::ops::Range<usize> {
    let index = u32::from_ne_bytes(key[..4].try_into().expect("array keys are u32")) as usize;
    index * value_len..(index + 1) * value_len
}

/// Offsets of each value in a value as read (one, or one per CPU for a per-CPU map) in the old
/// and the new layout.
fn chunk_starts(from: &Layout, to: &Layout, cpus: usize) -> Vec<(usize, usize)> {
    if !from.is_per_cpu() {
        return vec![(0, 0)];
    }
    let (old_stride, new_stride) = (from.value_len(cpus) / cpus, to.value_len(cpus) / cpus);
    (0..cpus)
        .map(|cpu| (cpu * old_stride, cpu * new_stride))
        .collect()
}

/// `value` (laid out as `from`) in the layout `to`: each CPU's value copied to the start of its
/// new place, the rest zero. Only `from.value_size` bytes are copied: a per-CPU value's padding
/// becomes the start of the appended fields.
pub fn widen(value: &[u8], from: &Layout, to: &Layout, cpus: usize) -> Vec<u8> {
    let mut out = vec![0u8; to.value_len(cpus)];
    let size = from.value_size as usize;
    for (old_at, new_at) in chunk_starts(from, to, cpus) {
        out[new_at..new_at + size].copy_from_slice(&value[old_at..old_at + size]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(map_type: u32, value_size: u32) -> Layout {
        Layout {
            map_type,
            key_size: 4,
            value_size,
            max_entries: 8,
            version: 1,
        }
    }

    #[test]
    fn a_value_is_zero_extended_per_cpu() {
        let (hash, per_cpu_array) = (1, 6);
        assert_eq!(
            widen(&[1, 2, 3], &layout(hash, 3), &layout(hash, 6), 2),
            [1, 2, 3, 0, 0, 0]
        );
        // Per CPU: 12 bytes padded to 16 (the padding is not copied), then 20 padded to 24.
        let mut old = vec![0xffu8; 32];
        old[..12].fill(1);
        old[16..28].fill(2);
        let new = widen(
            &old,
            &layout(per_cpu_array, 12),
            &layout(per_cpu_array, 20),
            2,
        );
        let mut expected = vec![0u8; 48];
        expected[..12].fill(1);
        expected[24..36].fill(2);
        assert_eq!(new, expected);
    }
}
