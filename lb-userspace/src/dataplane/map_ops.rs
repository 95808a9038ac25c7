//! Raw `bpf(2)` map operations on bytes, for what aya 0.14 lacks (batch lookups) or types too
//! strictly for a map whose layout is only known at run time (migrating pinned maps); and the
//! opening of a pin of any type, whose descriptor aya keeps to itself for links.
use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, Result};

/// Commands of `enum bpf_cmd` (linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's `ENOTSUPP` (not `EOPNOTSUPP`): a map type without batch operations (devmaps).
const ENOTSUPP: i32 = 524;

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call: large enough that a reconcile reads the
/// 131,072 backend slots in a few dozen calls, small enough that the buffers stay small.
const BATCH_ENTRIES: usize = 4096;
/// Bytes of keys and values one call may read: maps of large values (64 KiB maglev tables)
/// are read fewer entries at a time.
const BATCH_BYTES: usize = 1 << 20;
/// Fewest entries a call reads: a hash map's batch must hold a whole bucket.
const BATCH_ENTRIES_MIN: usize = 16;

/// The `batch` member of `union bpf_attr` (linux/bpf.h), which the `BPF_MAP_*_BATCH` commands
/// take.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    /// Where to go on from (`NULL`: the start): the last key read (arrays) or a bucket (hashes).
    in_batch: u64,
    /// Where the kernel says to go on from next time.
    out_batch: u64,
    keys: u64,
    values: u64,
    /// Entries the buffers hold; the kernel writes back how many it filled.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The anonymous member of `union bpf_attr` that `BPF_MAP_*_ELEM` and `BPF_MAP_GET_NEXT_KEY`
/// take (`value` is `next_key` for the latter).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The `BPF_OBJ_GET` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    /// 0: read and write, which links require.
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Returns what the call returned (a descriptor for the commands that make one).
fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is the `bpf_attr` member `cmd` reads; the buffers it points at are the
    // caller's and outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// Opens the object (map, link or program) pinned at `path`, for reading what the kernel says
/// of it in `/proc/self/fdinfo`.
pub fn open_pin(path: &Path) -> std::io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        ..ObjAttr::default()
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: a descriptor the kernel just made for us, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Reads the value of `key` into `value` (the map's value size; for a per-CPU map, every
/// possible CPU's value, each padded to 8 bytes). `false` when there is no such key.
pub fn lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> std::io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(err) => Err(err),
    }
}

/// Writes `key` → `value` (`BPF_ANY`: created or replaced).
pub fn update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> std::io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..ElemAttr::default()
    };
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Calls `f` with every entry of `map` as bytes: keys of `key_size`, values of `value_len` (see
/// [`lookup`]). Read with `BPF_MAP_LOOKUP_BATCH` (kernel 5.6): one system call per
/// `BATCH_ENTRIES` entries instead of one (two for a hash) per entry; entry by entry for the
/// map types without batch operations.
pub fn for_each_raw(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_len: usize,
    mut f: impl FnMut(&[u8], &[u8]),
) -> Result<()> {
    let batch = (BATCH_BYTES / (key_size + value_len)).clamp(BATCH_ENTRIES_MIN, BATCH_ENTRIES);
    let mut keys = vec![0u8; batch * key_size];
    let mut values = vec![0u8; batch * value_len];
    // The position token is a key (arrays) or a 4-byte bucket number (hashes).
    let token_size = key_size.max(8);
    let mut position = vec![0u8; token_size];
    let mut next = vec![0u8; token_size];
    let mut started = false;
    loop {
        let mut attr = BatchAttr {
            in_batch: if started { position.as_ptr() as u64 } else { 0 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: batch as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let error = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr).err();
        if !started
            && let Some(err) = &error
            && matches!(err.raw_os_error(), Some(ENOTSUPP | libc::EOPNOTSUPP))
        {
            return for_each_by_key(map, key_size, value_len, f);
        }
        for i in 0..attr.count as usize {
            f(
                &keys[i * key_size..(i + 1) * key_size],
                &values[i * value_len..(i + 1) * value_len],
            );
        }
        match error {
            None if attr.count > 0 => {}
            // The end of the map.
            None => return Ok(()),
            Some(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(err) => return Err(err).context("BPF_MAP_LOOKUP_BATCH"),
        }
        std::mem::swap(&mut position, &mut next);
        started = true;
    }
}

/// [`for_each_raw`] with `BPF_MAP_GET_NEXT_KEY` and a lookup per entry. An entry deleted
/// between the two is skipped. Also the cheaper way to read a large hash map that holds few
/// entries: a batch lookup walks every bucket.
pub fn for_each_by_key(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_len: usize,
    mut f: impl FnMut(&[u8], &[u8]),
) -> Result<()> {
    let mut key: Option<Vec<u8>> = None;
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; value_len];
    loop {
        let mut attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            key: key.as_ref().map_or(0, |k| k.as_ptr() as u64),
            value: next.as_mut_ptr() as u64,
            ..ElemAttr::default()
        };
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(err) => return Err(err).context("BPF_MAP_GET_NEXT_KEY"),
        }
        if lookup(map, &next, &mut value).context("BPF_MAP_LOOKUP_ELEM")? {
            f(&next, &value);
        }
        key = Some(next.clone());
    }
}
