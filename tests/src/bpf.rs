//! The few `bpf(2)` calls the harness makes itself, without aya (see the crate documentation):
//! loading a trivial XDP_PASS program, attaching it, and running any XDP program on a frame
//! with `BPF_PROG_TEST_RUN`, which the benchmark times.
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, bail};

/// `bpf(2)` commands, program type and attach type (`include/uapi/linux/bpf.h`).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_ATTACH_TYPE_XDP: u32 = 37;
/// `union bpf_attr` is larger than any command needs here; the kernel accepts a longer
/// attribute block as long as the unused tail is zero.
const BPF_ATTR_SIZE: usize = 128;

/// Room the output buffer of a test run leaves beyond the input frame: a program may grow the
/// frame (VXLAN encapsulation adds 50 bytes) into the kernel's 256-byte XDP headroom.
const TEST_RUN_GROWTH: usize = 256;

/// Calls `bpf(cmd, attr)` and returns what it returns (a descriptor or 0).
fn bpf(cmd: libc::c_long, attr: &mut [u8; BPF_ATTR_SIZE]) -> std::io::Result<i64> {
    // SAFETY: attr is a bpf_attr of BPF_ATTR_SIZE bytes whose pointers (if any) the caller
    // keeps alive across the call; the kernel reads and writes at most that many bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            BPF_ATTR_SIZE as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// `bpf(cmd, attr)` for a command that returns a new descriptor.
fn bpf_fd(cmd: libc::c_long, attr: &mut [u8; BPF_ATTR_SIZE]) -> Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the kernel returned a new descriptor this process now owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Loads `r0 = XDP_PASS; exit`: the least an XDP program can do, used to wake a veth's queue
/// (see [`NetNs::attach_xdp_pass`](crate::netns::NetNs::attach_xdp_pass)) and as the floor
/// the benchmark measures the data plane against.
pub fn load_xdp_pass() -> Result<OwnedFd> {
    const XDP_PASS: u8 = 2;
    let insns: [[u8; 8]; 2] = [
        [0xb7, 0, 0, 0, XDP_PASS, 0, 0, 0], // BPF_ALU64 | BPF_MOV | BPF_K, r0 = 2
        [0x95, 0, 0, 0, 0, 0, 0, 0],        // BPF_JMP | BPF_EXIT
    ];
    let license = c"GPL";
    let mut attr = [0u8; BPF_ATTR_SIZE];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..57].copy_from_slice(b"xdp_pass\0");
    bpf_fd(BPF_PROG_LOAD, &mut attr).context("cannot load an XDP_PASS program")
}

/// Attaches XDP program `prog` to interface `ifindex` through a BPF link, which detaches it
/// when the returned descriptor closes.
pub(crate) fn link_xdp(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    let mut attr = [0u8; BPF_ATTR_SIZE];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_ATTACH_TYPE_XDP.to_ne_bytes());
    bpf_fd(BPF_LINK_CREATE, &mut attr)
}

/// What one `BPF_PROG_TEST_RUN` of an XDP program returned.
#[derive(Debug, Clone)]
pub struct TestRun {
    /// The program's action (XDP_PASS, XDP_TX...).
    pub action: u32,
    /// The kernel's timing: nanoseconds per run, averaged over the `repeat` runs.
    pub duration_ns: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
}

/// Runs XDP program `prog` on `frame` `repeat` times in the kernel's loop (`BPF_PROG_TEST_RUN`),
/// with `ingress_ifindex` as the receiving interface if given (else the kernel's default,
/// loopback). The kernel runs every repetition on the same buffer: a program that rewrites the
/// frame sees its own output from the second run on, so only `repeat == 1` measures a program
/// that changes the frame.
pub fn test_run_xdp(
    prog: BorrowedFd<'_>,
    frame: &[u8],
    ingress_ifindex: Option<u32>,
    repeat: u32,
) -> Result<TestRun> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress_ifindex.unwrap_or(0).to_ne_bytes());
    let mut out = vec![0u8; frame.len() + TEST_RUN_GROWTH];
    let mut attr = [0u8; BPF_ATTR_SIZE];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    attr[12..16].copy_from_slice(&(out.len() as u32).to_ne_bytes());
    attr[16..24].copy_from_slice(&(frame.as_ptr() as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&repeat.to_ne_bytes());
    if ingress_ifindex.is_some() {
        attr[40..44].copy_from_slice(&(ctx.len() as u32).to_ne_bytes());
        attr[48..56].copy_from_slice(&(ctx.as_ptr() as u64).to_ne_bytes());
    }
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    let field = |at: usize| u32::from_ne_bytes(attr[at..at + 4].try_into().expect("4 bytes"));
    let size_out = field(12) as usize;
    if size_out > out.len() {
        bail!(
            "BPF_PROG_TEST_RUN wrote {size_out} bytes into a {}-byte buffer",
            out.len()
        );
    }
    out.truncate(size_out);
    Ok(TestRun {
        action: field(4),
        duration_ns: field(36),
        frame: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// The floor program passes the frame untouched, and the kernel loop reports a time.
    #[test]
    fn xdp_pass_floor_passes_frames_untouched() {
        crate::require_root().unwrap();
        let prog = load_xdp_pass().unwrap();
        let frame: Vec<u8> = (0..64u8).collect();
        let run = test_run_xdp(prog.as_fd(), &frame, None, 1000).unwrap();
        assert_eq!(run.action, 2);
        assert_eq!(run.frame, frame);
        assert!(
            run.duration_ns < 1_000_000,
            "{} ns per run",
            run.duration_ns
        );
    }
}
