//! The worker's system-call filter (seccomp-bpf).
//!
//! A worker installs it once its host-side setup is done (preopened
//! directories opened, WASI's runtime threads started) and before any guest
//! code runs. From then on the process, all its threads included, may make
//! only the system calls a serving worker was measured to make (see
//! `docs/security.md` for how the list was derived). Anything else fails
//! with `EPERM` ([`Mode::Errno`], the default) or kills the worker with
//! `SIGSYS` ([`Mode::Kill`]).
//!
//! Some calls are allowed with conditions on their arguments: threads but no
//! new processes (`clone` only with `CLONE_THREAD`), no new executable memory
//! (`mmap`/`mprotect` without `PROT_EXEC`), paths only relative to a
//! directory descriptor (never `AT_FDCWD`), signals only to the worker
//! itself, and only the CPU-time limit may be changed.
//!
//! The program is built by hand from a table of rules: for each rule, a
//! comparison with the system-call number and the argument checks, ending in
//! its action; a call that matches no rule falls through to the deny action.

use std::fmt;
use std::str::FromStr;

use libc::{
    BPF_ABS, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W, sock_filter, sock_fprog,
};

/// What a forbidden system call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// It fails with `EPERM`; the worker carries on.
    Errno,
    /// The kernel kills the worker with `SIGSYS`.
    Kill,
    /// No filter is installed.
    Off,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "errno" => Ok(Mode::Errno),
            "kill" => Ok(Mode::Kill),
            "off" => Ok(Mode::Off),
            _ => Err(format!("seccomp mode `{s}` is not one of errno, kill, off")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Errno => "errno",
            Mode::Kill => "kill",
            Mode::Off => "off",
        })
    }
}

/// A condition on one argument, comparing its low 32 bits.
#[derive(Debug, Clone, Copy)]
enum Cond {
    Eq(u8, u32),
    /// Equal to the process id of the worker installing the filter.
    EqPid(u8),
    Ne(u8, u32),
    HasBits(u8, u32),
    LacksBits(u8, u32),
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy)]
enum Action {
    Allow,
    Errno(i32),
}

/// One system call, allowed when all its conditions hold.
struct Rule {
    nr: libc::c_long,
    when: Vec<Cond>,
    action: Action,
}

fn allow(nr: libc::c_long) -> Rule {
    Rule { nr, when: Vec::new(), action: Action::Allow }
}

fn allow_if(nr: libc::c_long, when: &[Cond]) -> Rule {
    Rule { nr, when: when.to_vec(), action: Action::Allow }
}

/// The flags with which a zygote forks a worker: a new process whose parent
/// is the zygote's parent, signalling it with `SIGCHLD` when it ends.
pub const ZYGOTE_CLONE_FLAGS: libc::c_int = libc::CLONE_PARENT | libc::SIGCHLD;

/// `AT_FDCWD` as the low 32 bits of an argument.
const CWD: u32 = libc::AT_FDCWD as u32;
/// `PROT_EXEC` as an argument's bits.
const EXEC: u32 = libc::PROT_EXEC as u32;
/// `RLIMIT_CPU` as an argument (its C type differs between C libraries).
#[allow(clippy::unnecessary_cast)]
const CPU_LIMIT: u32 = libc::RLIMIT_CPU as u32;

/// The rules of a serving worker.
fn rules() -> Vec<Rule> {
    use Cond::*;
    use libc::*;
    let relative = [Ne(0, CWD)];
    let mut rules = vec![
        // Descriptors the worker already holds: its connection, the
        // guest's files, the runtime's event descriptors.
        allow(SYS_read),
        allow(SYS_write),
        allow(SYS_readv),
        allow(SYS_writev),
        allow(SYS_pread64),
        allow(SYS_pwrite64),
        allow(SYS_preadv),
        allow(SYS_pwritev),
        allow(SYS_preadv2),
        allow(SYS_pwritev2),
        allow(SYS_lseek),
        allow(SYS_close),
        allow(SYS_fcntl),
        allow(SYS_fsync),
        allow(SYS_fdatasync),
        allow(SYS_ftruncate),
        allow(SYS_fallocate),
        allow(SYS_fadvise64),
        allow(SYS_fstat),
        allow(SYS_getdents64),
        allow(SYS_recvfrom),
        allow(SYS_sendto),
        allow(SYS_recvmsg),
        allow(SYS_sendmsg),
        // Paths inside preopened directories, always relative to one.
        allow_if(SYS_openat, &relative),
        allow_if(SYS_openat2, &relative),
        // The filesystem library falls back to /proc when a guest touches a
        // file its user may not open; that open (relative to the working
        // directory) fails softly even in kill mode, so that a legitimate
        // WASI call is not punished with death.
        Rule { nr: SYS_openat, when: vec![Eq(0, CWD)], action: Action::Errno(libc::EPERM) },
        Rule { nr: SYS_openat2, when: vec![Eq(0, CWD)], action: Action::Errno(libc::EPERM) },
        allow_if(SYS_newfstatat, &relative),
        allow_if(SYS_statx, &relative),
        allow_if(SYS_mkdirat, &relative),
        allow_if(SYS_unlinkat, &relative),
        allow_if(SYS_readlinkat, &relative),
        allow_if(SYS_utimensat, &relative),
        allow_if(SYS_renameat2, &[Ne(0, CWD), Ne(2, CWD)]),
        allow_if(SYS_linkat, &[Ne(0, CWD), Ne(2, CWD)]),
        allow_if(SYS_symlinkat, &[Ne(1, CWD)]),
        // Memory: linear memories grow and reset; never new executable pages.
        allow_if(SYS_mmap, &[LacksBits(2, EXEC)]),
        allow_if(SYS_mprotect, &[LacksBits(2, EXEC)]),
        allow(SYS_munmap),
        allow(SYS_madvise),
        allow(SYS_mremap),
        allow(SYS_brk),
        // Threads (the WASI runtime's), never processes. glibc tries clone3
        // first, whose flags a filter cannot read, and falls back to clone
        // on ENOSYS.
        allow_if(SYS_clone, &[HasBits(0, CLONE_THREAD as u32)]),
        Rule { nr: SYS_clone3, when: Vec::new(), action: Action::Errno(ENOSYS) },
        allow(SYS_futex),
        allow(SYS_set_robust_list),
        allow(SYS_rseq),
        allow(SYS_sched_yield),
        allow(SYS_sched_getaffinity),
        allow(SYS_gettid),
        allow(SYS_getpid),
        allow(SYS_exit),
        allow(SYS_exit_group),
        allow_if(SYS_prctl, &[Eq(0, PR_SET_NAME as u32)]),
        allow_if(SYS_prctl, &[Eq(0, PR_GET_NAME as u32)]),
        // Signals: traps of the guest are signals handled in-process.
        allow(SYS_rt_sigaction),
        allow(SYS_rt_sigprocmask),
        allow(SYS_rt_sigreturn),
        allow(SYS_sigaltstack),
        allow(SYS_restart_syscall),
        allow_if(SYS_tgkill, &[EqPid(0)]),
        // Time and waiting: WASI clocks and sleeps, the watchdog's poll.
        allow(SYS_clock_gettime),
        allow(SYS_clock_getres),
        allow(SYS_clock_nanosleep),
        allow(SYS_nanosleep),
        allow(SYS_gettimeofday),
        allow(SYS_ppoll),
        allow(SYS_epoll_pwait),
        allow(SYS_epoll_ctl),
        // Starting WASI's runtime on first use: its event loop and wakers.
        // These make new descriptors but reach nothing outside the process.
        allow(SYS_epoll_create1),
        allow(SYS_eventfd2),
        allow_if(SYS_socketpair, &[Eq(0, libc::AF_UNIX as u32)]),
        allow(SYS_getrandom),
        // The per-entry CPU-time backstop re-arms RLIMIT_CPU, nothing else.
        allow_if(SYS_prlimit64, &[Eq(0, 0), Eq(1, CPU_LIMIT)]),
    ];
    rules.extend(arch::extra_rules());
    rules
}

/// A compiled filter, ready to install.
///
/// The daemon builds it once; each worker fills in its own process id (for
/// the rule that lets it signal only itself) and installs it.
pub struct Filter {
    program: Vec<sock_filter>,
    /// Steps whose constant is the installing process's id.
    pid_steps: Vec<usize>,
}

impl Filter {
    /// Builds the filter; `None` when `mode` is [`Mode::Off`] or the
    /// architecture is not supported.
    pub fn new(mode: Mode) -> Option<Filter> {
        Filter::build(mode, &rules())
    }

    /// The filter of a zygote: a worker's, plus the one kind of `clone`
    /// that forks a worker as a sibling (`CLONE_PARENT`, so the daemon is
    /// its parent). Each forked worker adds the worker filter on top, which
    /// forbids that call again.
    pub fn for_zygote(mode: Mode) -> Option<Filter> {
        let mut rules = rules();
        rules.push(allow_if(libc::SYS_clone, &[Cond::Eq(0, ZYGOTE_CLONE_FLAGS as u32)]));
        // What a forked worker needs to add its own filter (which can only
        // take more away).
        rules.push(allow_if(libc::SYS_prctl, &[Cond::Eq(0, libc::PR_SET_NO_NEW_PRIVS as u32)]));
        rules.push(allow_if(
            libc::SYS_seccomp,
            &[
                Cond::Eq(0, libc::SECCOMP_SET_MODE_FILTER),
                Cond::Eq(1, libc::SECCOMP_FILTER_FLAG_TSYNC as u32),
            ],
        ));
        Filter::build(mode, &rules)
    }

    fn build(mode: Mode, rules: &[Rule]) -> Option<Filter> {
        let deny = match mode {
            Mode::Errno => libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
            Mode::Kill => libc::SECCOMP_RET_KILL_PROCESS,
            Mode::Off => return None,
        };
        let arch = arch::AUDIT_ARCH?;
        let (program, pid_steps) = assemble(arch, rules, deny);
        Some(Filter { program, pid_steps })
    }

    /// Installs the filter on every thread of this process, whose id is
    /// `pid`, after setting `PR_SET_NO_NEW_PRIVS` (which the kernel requires).
    pub fn install(&self, pid: u32) -> std::io::Result<()> {
        let mut program = self.program.clone();
        for &step in &self.pid_steps {
            program[step].k = pid;
        }
        set_no_new_privs()?;
        let prog = sock_fprog {
            len: u16::try_from(program.len()).expect("the filter has fewer than 65536 steps"),
            filter: program.as_mut_ptr(),
        };
        // SAFETY: `prog` points at `program`, which outlives the call; the
        // kernel copies the program.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_TSYNC,
                &prog as *const sock_fprog,
            )
        };
        match rc {
            0 => Ok(()),
            // With TSYNC, a positive result names a thread that could not be
            // synchronised; the filter was not installed anywhere.
            tid if tid > 0 => {
                Err(std::io::Error::other(format!("thread {tid} could not take the filter")))
            }
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    /// Number of BPF instructions.
    pub fn len(&self) -> usize {
        self.program.len()
    }

    /// Whether the program is empty (it never is).
    pub fn is_empty(&self) -> bool {
        self.program.is_empty()
    }
}

/// Forbids gaining privileges through exec (setuid binaries, file caps).
pub fn set_no_new_privs() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Offsets into `struct seccomp_data`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;

/// Offset of the low 32 bits of argument `i` (little-endian).
fn arg_offset(i: u8) -> u32 {
    16 + 8 * i as u32
}

fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code: code as u16, jt, jf, k }
}

/// Turns the rules into a BPF program; calls matching none get `deny`.
/// Also returns the steps that compare with the installing process's id.
fn assemble(audit_arch: u32, rules: &[Rule], deny: u32) -> (Vec<sock_filter>, Vec<usize>) {
    let load = |offset| stmt(BPF_LD | BPF_W | BPF_ABS, offset);
    let ret = |action| stmt(BPF_RET | BPF_K, action);
    let mut program = vec![
        // Another ABI's numbers mean other calls: refuse them outright.
        load(ARCH_OFFSET),
        jump(BPF_JMP | BPF_JEQ | BPF_K, audit_arch, 1, 0),
        ret(libc::SECCOMP_RET_KILL_PROCESS),
        load(NR_OFFSET),
    ];
    if let Some(bit) = arch::FOREIGN_NR_BIT {
        // x32 calls share the architecture tag; they carry this bit.
        program.push(jump(BPF_JMP | BPF_JSET | BPF_K, bit, 0, 1));
        program.push(ret(deny));
    }
    let mut pid_steps = Vec::new();
    for rule in rules {
        let (body, pid_at) = rule_body(rule);
        let skip = u8::try_from(body.len()).expect("a rule has fewer than 256 steps");
        program.push(jump(BPF_JMP | BPF_JEQ | BPF_K, rule.nr as u32, 0, skip));
        pid_steps.extend(pid_at.into_iter().map(|i| program.len() + i));
        program.extend(body);
    }
    program.push(ret(deny));
    (program, pid_steps)
}

/// The steps of one rule after its number matched: the argument checks,
/// each jumping past the rule's end when it fails, then the action. A rule
/// that loaded an argument reloads the number before falling through, so
/// the next rule compares the number again. Also returns the steps (within
/// the body) that compare with the process id.
fn rule_body(rule: &Rule) -> (Vec<sock_filter>, Vec<usize>) {
    let action = match rule.action {
        Action::Allow => libc::SECCOMP_RET_ALLOW,
        Action::Errno(e) => libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA),
    };
    let n = rule.when.len();
    let mut body = Vec::with_capacity(2 * n + 2);
    let mut pid_at = Vec::new();
    for (i, cond) in rule.when.iter().enumerate() {
        // Steps after this condition's jump up to the reload: the remaining
        // conditions (two steps each) and the return.
        let to_fail = u8::try_from(2 * (n - i - 1) + 1).expect("few conditions");
        let (arg, code, k, pass_on_match) = match *cond {
            Cond::Eq(a, v) => (a, BPF_JEQ, v, true),
            Cond::EqPid(a) => {
                pid_at.push(body.len() + 1);
                (a, BPF_JEQ, 0, true)
            }
            Cond::Ne(a, v) => (a, BPF_JEQ, v, false),
            Cond::HasBits(a, m) => (a, BPF_JSET, m, true),
            Cond::LacksBits(a, m) => (a, BPF_JSET, m, false),
        };
        body.push(stmt(BPF_LD | BPF_W | BPF_ABS, arg_offset(arg)));
        let (jt, jf) = if pass_on_match { (0, to_fail) } else { (to_fail, 0) };
        body.push(jump(BPF_JMP | code | BPF_K, k, jt, jf));
    }
    body.push(stmt(BPF_RET | BPF_K, action));
    if n > 0 {
        body.push(stmt(BPF_LD | BPF_W | BPF_ABS, NR_OFFSET));
    }
    (body, pid_at)
}

#[cfg(target_arch = "x86_64")]
mod arch {
    use super::{CWD, Cond::Ne, Rule, allow, allow_if};

    pub const AUDIT_ARCH: Option<u32> = Some(0xc000_003e);
    pub const FOREIGN_NR_BIT: Option<u32> = Some(0x4000_0000);

    /// Calls x86_64 has besides the generic ones.
    pub fn extra_rules() -> Vec<Rule> {
        vec![
            allow(libc::SYS_poll),
            allow(libc::SYS_epoll_wait),
            allow_if(libc::SYS_renameat, &[Ne(0, CWD), Ne(2, CWD)]),
        ]
    }
}

#[cfg(target_arch = "aarch64")]
mod arch {
    use super::Rule;

    pub const AUDIT_ARCH: Option<u32> = Some(0xc000_00b7);
    pub const FOREIGN_NR_BIT: Option<u32> = None;

    pub fn extra_rules() -> Vec<Rule> {
        Vec::new()
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod arch {
    use super::Rule;

    pub const AUDIT_ARCH: Option<u32> = None;
    pub const FOREIGN_NR_BIT: Option<u32> = None;

    pub fn extra_rules() -> Vec<Rule> {
        Vec::new()
    }
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use std::io::Error;

    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};

    use super::*;

    /// Runs `probe` in a forked child under the filter; returns how the child ended.
    fn in_filtered_child(mode: Mode, probe: fn() -> i32) -> WaitStatus {
        // SAFETY: the child only builds the filter, runs the probe and
        // _exits; it never returns into the test harness.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                let pid = std::process::id();
                let code = match Filter::new(mode).unwrap().install(pid) {
                    Ok(()) => probe(),
                    Err(_) => 100,
                };
                // SAFETY: ends the forked child at once.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => waitpid(child, None).unwrap(),
        }
    }

    fn failed_with(rc: i64, errno: i32) -> bool {
        rc == -1 && Error::last_os_error().raw_os_error() == Some(errno)
    }

    /// Exit code: 0 if every forbidden call failed with EPERM, else the
    /// number of the first check that went wrong.
    fn forbidden_calls_fail() -> i32 {
        // SAFETY: plain system calls with valid (or deliberately invalid
        // but harmless) arguments; none touches memory of this process
        // except through the pointers given.
        let checks: [(i32, i64); 7] = unsafe {
            [
                (1, libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64),
                (2, libc::fork() as i64),
                (3, libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) as i64),
                (4, libc::kill(libc::getppid(), 0) as i64),
                (5, libc::syscall(libc::SYS_tgkill, libc::getppid(), libc::getppid(), 0)),
                (
                    6,
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    ) as i64,
                ),
                (7, libc::execv(c"/bin/true".as_ptr(), [std::ptr::null()].as_ptr()) as i64),
            ]
        };
        for (n, rc) in checks {
            if !failed_with(rc, libc::EPERM) {
                return n;
            }
        }
        0
    }

    /// Exit code: 0 if what a worker needs still works.
    fn allowed_calls_work() -> i32 {
        let thread = std::thread::spawn(|| std::time::Instant::now().elapsed());
        if thread.join().is_err() {
            return 1;
        }
        let mut buf = [0u8; 16];
        // SAFETY: `buf` is valid for 16 bytes.
        if unsafe { libc::getrandom(buf.as_mut_ptr().cast(), 16, 0) } != 16 {
            return 2;
        }
        let big = vec![1u8; 8 << 20];
        if big.iter().map(|b| *b as usize).sum::<usize>() != 8 << 20 {
            return 3;
        }
        // SAFETY: signal 0 to this very process only checks it exists.
        if unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), 0) } != 0 {
            return 4;
        }
        0
    }

    /// The exit code of a child that exited normally.
    fn code(status: WaitStatus) -> Option<i32> {
        match status {
            WaitStatus::Exited(_, code) => Some(code),
            _ => None,
        }
    }

    #[test]
    fn forbidden_calls_fail_with_eperm_in_errno_mode() {
        assert_eq!(code(in_filtered_child(Mode::Errno, forbidden_calls_fail)), Some(0));
    }

    #[test]
    fn threads_memory_random_and_self_signals_still_work() {
        assert_eq!(code(in_filtered_child(Mode::Errno, allowed_calls_work)), Some(0));
        assert_eq!(code(in_filtered_child(Mode::Kill, allowed_calls_work)), Some(0));
    }

    #[test]
    fn a_forbidden_call_kills_the_process_in_kill_mode() {
        fn open_socket() -> i32 {
            // SAFETY: a plain system call.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            0
        }
        match in_filtered_child(Mode::Kill, open_socket) {
            WaitStatus::Signaled(_, sig, _) => assert_eq!(sig, nix::sys::signal::SIGSYS),
            other => panic!("expected death by SIGSYS, got {other:?}"),
        }
    }

    #[test]
    fn off_mode_builds_no_filter() {
        assert!(Filter::new(Mode::Off).is_none());
        assert_eq!("kill".parse::<Mode>(), Ok(Mode::Kill));
        assert!("strict".parse::<Mode>().unwrap_err().contains("errno, kill, off"));
    }
}
