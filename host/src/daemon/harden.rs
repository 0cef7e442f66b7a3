//! The OS wall around a worker: descriptors, identity, rlimits.
//!
//! Applied in the forked child, in this order: right after the fork the
//! worker drops every descriptor it does not need and, when the daemon runs
//! as root and was told to, becomes another user; once it knows its module
//! it sets its rlimits; just before guest code runs it installs the
//! system-call filter ([`super::seccomp`]). See `docs/security.md`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use nix::unistd::{Gid, Group, Uid, User};

use super::settings::Limits;

/// The user and group workers run as, when the daemon drops privileges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: Uid,
    /// Group id; the only group the worker keeps.
    pub gid: Gid,
}

impl Identity {
    /// Resolves `--user` and `--group` (names or numbers); the group
    /// defaults to the user's primary group.
    pub fn resolve(user: &str, group: Option<&str>) -> Result<Identity, String> {
        let found = match user.parse::<u32>() {
            Ok(n) => User::from_uid(Uid::from_raw(n)),
            Err(_) => User::from_name(user),
        }
        .map_err(|e| format!("looking up user `{user}`: {e}"))?;
        let (uid, primary) = match (found, user.parse::<u32>()) {
            (Some(u), _) => (u.uid, Some(u.gid)),
            (None, Ok(n)) => (Uid::from_raw(n), None),
            (None, Err(_)) => return Err(format!("no user named `{user}`")),
        };
        let gid = match group {
            Some(g) => match g.parse::<u32>() {
                Ok(n) => Gid::from_raw(n),
                Err(_) => {
                    Group::from_name(g)
                        .map_err(|e| format!("looking up group `{g}`: {e}"))?
                        .ok_or_else(|| format!("no group named `{g}`"))?
                        .gid
                }
            },
            None => primary.ok_or_else(|| {
                format!("user id {user} has no passwd entry; give its group with --group")
            })?,
        };
        if !Uid::effective().is_root() && (uid != Uid::effective() || gid != Gid::effective()) {
            return Err(format!(
                "running workers as uid {uid} gid {gid} needs root (the daemon runs as uid {})",
                Uid::effective()
            ));
        }
        Ok(Identity { uid, gid })
    }

    /// Becomes this user and group for good, with no supplementary groups.
    pub fn assume(self) -> io::Result<()> {
        let (uid, gid) = (self.uid, self.gid);
        if Uid::effective().is_root() {
            nix::unistd::setgroups(&[gid]).map_err(io::Error::from)?;
        }
        nix::unistd::setresgid(gid, gid, gid).map_err(io::Error::from)?;
        nix::unistd::setresuid(uid, uid, uid).map_err(io::Error::from)?;
        // A drop that could be undone is no drop at all.
        if !uid.is_root() && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
            return Err(io::Error::other("could still become root after dropping privileges"));
        }
        Ok(())
    }
}

/// `/dev/null`, opened once by the daemon so that workers can put it in
/// place of stdin and stdout.
pub fn open_dev_null() -> io::Result<OwnedFd> {
    let path = CString::new("/dev/null").expect("no NUL in a literal");
    // SAFETY: a plain open of a valid C string.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Points stdin and stdout at `/dev/null` (a worker reads and prints
/// nothing there; stderr stays, for its log) and closes every descriptor
/// not in `keep`.
pub fn close_inherited_fds(dev_null: Option<&OwnedFd>, keep: &[RawFd]) {
    if let Some(null) = dev_null {
        for target in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
            // SAFETY: dup2 onto a standard descriptor; both are valid.
            unsafe { libc::dup2(null.as_raw_fd(), target) };
        }
    }
    let mut keep: Vec<RawFd> = keep.iter().copied().chain(0..=2).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 0u32;
    for fd in keep {
        let fd = fd as u32;
        if fd > from {
            close_range(from, fd - 1);
        }
        from = fd + 1;
    }
    close_range(from, u32::MAX);
}

fn close_range(first: u32, last: u32) {
    // SAFETY: closing descriptors whose Rust owners (if any) live in the
    // parent's stack frames, which this forked child never returns to.
    let rc = unsafe { libc::close_range(first, last, 0) };
    if rc != 0 {
        // Kernels before 5.9: close what /proc lists.
        for fd in open_fds().into_iter().filter(|fd| (first..=last).contains(&(*fd as u32))) {
            // SAFETY: as above.
            unsafe { libc::close(fd) };
        }
    }
}

/// The descriptors this process has open.
pub fn open_fds() -> Vec<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return Vec::new() };
    let fds: Vec<RawFd> = dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    // The listing's own descriptor is closed by now; drop it from the list.
    fds.into_iter().filter(|fd| fcntl_ok(*fd)).collect()
}

fn fcntl_ok(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only asks whether `fd` is open.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Address space a worker holds now, in bytes (`VmSize`).
pub fn address_space() -> io::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| io::Error::other(format!("unreadable /proc/self/statm: {statm:?}")))?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    Ok(pages * page)
}

/// Sets the worker's rlimits for a guest with `limits`; `reserved` is the
/// address space the guest's linear memories will reserve up front.
///
/// Core dumps are off (a dump would hold guest data), the descriptor count
/// is capped, and the address space may grow by `limits.host_memory` beyond
/// what the worker holds now plus `reserved`.
pub fn set_rlimits(limits: &Limits, reserved: u64) -> io::Result<AddressSpace> {
    set_rlimit(libc::RLIMIT_CORE, 0, 0)?;
    let files = limits.files.min(hard_limit(libc::RLIMIT_NOFILE)?);
    set_rlimit(libc::RLIMIT_NOFILE, files, files)?;
    let now = address_space()?;
    let cap = now.saturating_add(reserved).saturating_add(limits.host_memory);
    set_rlimit(libc::RLIMIT_AS, cap, cap)?;
    // A worker that cannot dump cannot be read through /proc or ptrace by
    // other processes of its user either.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    Ok(AddressSpace { at_start: now, cap })
}

/// The address-space figures of one worker, for its log.
#[derive(Debug, Clone, Copy)]
pub struct AddressSpace {
    /// Bytes mapped when the limits were set.
    pub at_start: u64,
    /// `RLIMIT_AS`.
    pub cap: u64,
}

/// CPU time the calling thread has used so far.
///
/// The thread's clock, not the process's: the kernel keeps the process
/// clock current only at ticks and context switches (measured here: it read
/// 0 µs for a call of 500 µs of CPU), while it brings the calling thread's
/// up to date when read. A worker runs its guest on one thread.
pub fn thread_cpu() -> std::time::Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(std::time::Duration::from)
        .unwrap_or_default()
}

/// Whether this process keeps a CPU-time backstop (see [`ensure_cpu_room`]).
static BACKSTOP: AtomicBool = AtomicBool::new(false);

/// Makes this process (a worker or zygote) keep a CPU-time backstop.
pub fn enable_cpu_backstop() {
    BACKSTOP.store(true, Relaxed);
}

/// RLIMIT_CPU kept far enough ahead of the CPU time used: the kernel ends
/// the process with SIGXCPU should the watchdog thread ever fail to end a
/// runaway guest entry.
///
/// Makes sure `seconds` more CPU time are allowed after `used`. Each guest
/// entry asks for the room its bound needs; the worker's reading of
/// requests between entries asks for some too (a request that trickles in
/// for minutes costs CPU time outside any entry). Re-armed only when the
/// room left is less than asked, and then with twice that room, so that
/// most calls make no system call for it; the backstop is thus at most
/// twice as loose as an entry's bound. The limit is the process's, so is
/// what was set last.
///
/// Does nothing in a process that has not called [`enable_cpu_backstop`]
/// (the daemon's own, or a test's).
pub fn ensure_cpu_room(used: std::time::Duration, seconds: u64) {
    static ARMED: AtomicU64 = AtomicU64::new(0);
    if !BACKSTOP.load(Relaxed) {
        return;
    }
    let used = used.as_secs().saturating_add(1);
    if ARMED.load(Relaxed) >= used.saturating_add(seconds) {
        return;
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: `limit` is valid for writes for the duration of the call.
    unsafe { libc::getrlimit(libc::RLIMIT_CPU, &mut limit) };
    limit.rlim_cur = used.saturating_add(seconds.saturating_mul(2)).min(limit.rlim_max);
    // SAFETY: `limit` is a valid rlimit for the duration of the call.
    unsafe { libc::setrlimit(libc::RLIMIT_CPU, &limit) };
    ARMED.store(limit.rlim_cur, Relaxed);
}

fn set_rlimit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: `limit` is a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(resource, &limit) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn hard_limit(resource: libc::__rlimit_resource_t) -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is valid for writes for the duration of the call.
    if unsafe { libc::getrlimit(resource, &mut limit) } == 0 {
        Ok(limit.rlim_max)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The soft limit of the main thread's stack, or `None` when unlimited.
pub fn stack_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is valid for writes for the duration of the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}
