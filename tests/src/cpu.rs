//! The CPUs this process may run on (its affinity, which a cpuset narrows: CPUs 4–7 of a
//! larger machine, say), and pinning a thread to one of them. Tests and the bench that keep
//! work on one CPU pick it here, never by number.
use std::mem::size_of;

use anyhow::{Context, Result};

/// The CPUs the calling thread may run on, in increasing order.
pub fn allowed() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data, all zeroes is the empty set; sched_getaffinity only
    // writes inside the set it is given, and CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect();
        anyhow::ensure!(!cpus.is_empty(), "this process may run on no CPU");
        Ok(cpus)
    }
}

/// The lowest-numbered CPU this process may run on.
pub fn first() -> Result<usize> {
    Ok(allowed()?[0])
}

/// The highest-numbered CPU this process may run on.
pub fn last() -> Result<usize> {
    Ok(*allowed()?.last().expect("allowed() is never empty"))
}

/// Pins thread `tid` (0: the calling thread) to CPU `cpu`. Threads it starts afterwards
/// inherit the pinning.
pub fn pin(tid: libc::pid_t, cpu: usize) -> Result<()> {
    // SAFETY: as in `allowed`; CPU_SET only writes inside the set (it ignores a cpu beyond
    // the set's size, which the kernel then refuses).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot pin thread {tid} to CPU {cpu}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowed_cpus_include_the_one_this_thread_runs_on() {
        // SAFETY: sched_getcpu has no preconditions.
        let now = unsafe { libc::sched_getcpu() };
        let cpus = allowed().unwrap();
        assert!(cpus.contains(&(now as usize)), "{now} not in {cpus:?}");
        assert!(first().unwrap() <= last().unwrap());
    }
}
