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

/// XDP actions (`enum xdp_action`).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
/// `BPF_F_TEST_XDP_LIVE_FRAMES`: a test run whose frames really leave (redirect, XDP_TX).
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
/// The `bpf_redirect` helper's number.
const BPF_FUNC_REDIRECT: i32 = 23;
/// `bpf_get_prandom_u32`.
const BPF_FUNC_PRANDOM: i32 = 7;

/// One BPF instruction: opcode, destination and source registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut raw = [0u8; 8];
    raw[0] = code;
    raw[1] = (src << 4) | dst;
    raw[2..4].copy_from_slice(&off.to_le_bytes());
    raw[4..8].copy_from_slice(&imm.to_le_bytes());
    raw
}

/// `rDST = imm` (BPF_ALU64 | BPF_MOV | BPF_K).
fn mov_imm(dst: u8, imm: i32) -> [u8; 8] {
    insn(0xb7, dst, 0, 0, imm)
}

/// `exit`.
const EXIT: [u8; 8] = [0x95, 0, 0, 0, 0, 0, 0, 0];

/// Loads an XDP program of `insns` named `name` (at most 15 bytes).
fn load_xdp(insns: &[[u8; 8]], name: &str) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = [0u8; BPF_ATTR_SIZE];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    let name = &name.as_bytes()[..name.len().min(15)];
    attr[48..48 + name.len()].copy_from_slice(name);
    bpf_fd(BPF_PROG_LOAD, &mut attr).with_context(|| format!("cannot load XDP program {name:?}"))
}

/// Loads `r0 = XDP_PASS; exit`: the least an XDP program can do, used to wake a veth's queue
/// (see [`NetNs::attach_xdp_pass`](crate::netns::NetNs::attach_xdp_pass)) and as the floor
/// the benchmark measures the data plane against.
pub fn load_xdp_pass() -> Result<OwnedFd> {
    load_xdp_action(XDP_PASS)
}

/// Loads `r0 = action; exit`: a program that passes, drops (a sink, a floor) or bounces
/// (`XDP_TX`) every frame.
pub fn load_xdp_action(action: u32) -> Result<OwnedFd> {
    let name = match action {
        XDP_DROP => "xdp_drop",
        XDP_PASS => "xdp_pass",
        XDP_TX => "xdp_tx",
        _ => "xdp_action",
    };
    load_xdp(&[mov_imm(0, action as i32), EXIT], name)
}

/// Loads a packet generator for [`live_frames`]: on every run it writes `frame` (whose length
/// must be a multiple of 4) over the packet, since the kernel recycles the generator's pages
/// with whatever a receiver wrote into them, and redirects it to `ifindex`.
pub fn load_frame_generator(frame: &[u8], ifindex: u32) -> Result<OwnedFd> {
    load_flows_generator(frame, ifindex, None)
}

/// [`load_frame_generator`], and with `port_at` the 16 bits at that offset of the frame (a
/// source port) drawn at random for every frame, from 1024 to 65535: 64,512 flows. The frame's
/// UDP checksums must be 0 (none), which a changed port leaves valid.
pub fn load_flows_generator(frame: &[u8], ifindex: u32, port_at: Option<usize>) -> Result<OwnedFd> {
    if frame.is_empty() || !frame.len().is_multiple_of(4) || frame.len() > 1024 {
        bail!(
            "a generated frame is 4 to 1024 bytes, a multiple of 4: not {}",
            frame.len()
        );
    }
    let words = frame
        .chunks(4)
        .map(|w| i32::from_ne_bytes(w.try_into().expect("4 bytes")));
    let mut insns = vec![
        insn(0xbf, 6, 1, 0, 0),                  // r6 = ctx
        insn(0x61, 2, 6, 0, 0),                  // r2 = ctx->data
        insn(0x61, 3, 6, 4, 0),                  // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0),                  // r4 = r2
        insn(0x07, 4, 0, 0, frame.len() as i32), // r4 += len
    ];
    let mut stores: Vec<[u8; 8]> = words
        .enumerate()
        .map(|(i, word)| insn(0x62, 2, 0, (i * 4) as i16, word)) // *(u32 *)(r2 + 4i) = word
        .collect();
    if let Some(at) = port_at {
        if at + 2 > frame.len() {
            bail!("a port at {at} is beyond a frame of {} bytes", frame.len());
        }
        stores.extend([
            insn(0xbf, 7, 2, 0, 0),                // r7 = r2 (the call clobbers r2)
            insn(0x85, 0, 0, 0, BPF_FUNC_PRANDOM), // r0 = bpf_get_prandom_u32()
            insn(0x57, 0, 0, 0, 0xffff),           // r0 &= 0xffff
            insn(0x35, 0, 0, 1, 1024),             // if r0 >= 1024: skip the next
            insn(0x07, 0, 0, 0, 1024),             // r0 += 1024
            insn(0x6b, 7, 0, at as i16, 0),        // *(u16 *)(r7 + at) = r0
        ]);
    }
    let tail = [
        mov_imm(1, ifindex as i32),
        mov_imm(2, 0),
        insn(0x85, 0, 0, 0, BPF_FUNC_REDIRECT),
        EXIT,
    ];
    // if r4 > r3 (frame shorter than asked): skip to the drop at the end.
    let skip = (stores.len() + tail.len()) as i16;
    insns.push(insn(0x2d, 4, 3, skip, 0));
    insns.extend(stores);
    insns.extend(tail);
    insns.extend([mov_imm(0, XDP_DROP as i32), EXIT]);
    load_xdp(&insns, "lbbench_gen")
}

/// Runs generator `prog` (see [`load_frame_generator`]) `frames` times with
/// `BPF_F_TEST_XDP_LIVE_FRAMES`, in batches of 64: the frames really leave by its redirect,
/// and whatever receives them runs in the same softirq, on this CPU, before the call returns.
/// Returns the call's wall time, in nanoseconds.
pub fn live_frames(prog: &OwnedFd, frame_len: usize, frames: u32) -> Result<u64> {
    // struct xdp_md: data 0, data_end = the frame's length.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame_len as u32).to_ne_bytes());
    let data = vec![0u8; frame_len];
    let mut attr = [0u8; BPF_ATTR_SIZE];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&(frame_len as u32).to_ne_bytes());
    attr[16..24].copy_from_slice(&(data.as_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&frames.to_ne_bytes());
    attr[40..44].copy_from_slice(&(ctx.len() as u32).to_ne_bytes());
    attr[48..56].copy_from_slice(&(ctx.as_ptr() as u64).to_ne_bytes());
    attr[64..68].copy_from_slice(&BPF_F_TEST_XDP_LIVE_FRAMES.to_ne_bytes());
    attr[72..76].copy_from_slice(&64u32.to_ne_bytes());
    let started = std::time::Instant::now();
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN with live frames")?;
    Ok(started.elapsed().as_nanos() as u64)
}

/// Attaches XDP program `prog` to interface `ifindex` through a BPF link, which detaches it
/// when the returned descriptor closes.
pub fn link_xdp(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
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
