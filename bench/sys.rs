//! Process-level helpers: pinning, CPU time, memory from /proc.

use std::time::Duration;

/// Pins the thread `tid` (0 for the caller, or a process's main thread id)
/// to `cpu`, or lets it run anywhere when `None`.
pub fn pin(tid: i32, cpu: Option<usize>) {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let cpus = match cpu {
        Some(c) => vec![c],
        None => (0..available_cpus()).collect(),
    };
    for c in cpus {
        // SAFETY: `c` is below the number of CPUs, far below CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

/// Number of CPUs this machine has online (not the caller's affinity,
/// which pinning narrows).
pub fn available_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// CPU time (user and system) this process has used so far.
pub fn process_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The CPU that process `pid` (0 for this one) last ran on, from
/// /proc/PID/stat.
pub fn last_cpu(pid: i32) -> Option<usize> {
    let path = if pid == 0 { "/proc/self/stat".to_owned() } else { format!("/proc/{pid}/stat") };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which may hold spaces: the processor
    // is field 39 of the line, the 37th after it.
    text.rsplit_once(')')?.1.split_whitespace().nth(36)?.parse().ok()
}

/// Memory figures of a process, in bytes, from /proc/PID/smaps_rollup.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Memory {
    pub rss: u64,
    pub pss: u64,
    pub private: u64,
}

/// Reads the memory of `pid`.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok(Memory {
        rss: field("Rss:"),
        pss: field("Pss:"),
        private: field("Private_Clean:") + field("Private_Dirty:"),
    })
}

/// A one-line description of the machine, for the report.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown cpu");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{} x {model}, linux {}", available_cpus(), kernel.trim())
}
