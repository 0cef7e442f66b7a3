//! The daemon: a fork-per-connection server that hosts guests in wasmtime.
//!
//! The parent process compiles every module once ([`modules`]), binds the
//! listening socket and runs a single-threaded accept loop ([`listener`])
//! that reads each client's hello (`hello`) and starts a worker process
//! ([`worker`]) for it: forked from the module's zygote (`zygote`), which
//! instantiated the guest ([`guest`]) and ran its init hook once, or forked
//! plainly, instantiating the guest itself. The worker serves calls until
//! the connection closes. A watchdog thread in each worker (`watchdog`)
//! enforces call deadlines and notices a vanished client.
//!
//! Each module has its own sandbox settings ([`settings`]: limits,
//! environment, arguments, determinism, spawn mode). Each worker and zygote
//! walls itself in at the OS level ([`harden`]: descriptors, identity,
//! rlimits) and with a system-call filter ([`seccomp`]) before guest code
//! runs.

mod capture;
pub mod guest;
pub mod harden;
mod hello;
pub mod listener;
pub mod modules;
pub mod seccomp;
pub mod settings;
mod title;
mod watchdog;
pub mod worker;
mod zygote;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use listener::serve;

/// Everything the daemon needs to run, as parsed from the command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: crate::Address,
    /// The modules to serve; names are unique.
    pub modules: Vec<ModuleSpec>,
    /// Directories to preopen for guests.
    pub dirs: Vec<DirSpec>,
    /// Limits, environment, arguments and determinism, per module or for all.
    pub settings: settings::SettingSpecs,
    /// Largest frame accepted from a client, in bytes.
    pub max_frame: usize,
    /// Longest a worker may stay in one guest entry, whatever deadline the
    /// client gave; past it (and a grace period) the worker ends itself.
    pub hung_timeout: Duration,
    /// Most worker processes alive at once; further connections wait.
    pub max_workers: usize,
    /// What the workers' system-call filter does with forbidden calls.
    pub seccomp: seccomp::Mode,
    /// The user and group workers run as, if the daemon drops privileges.
    pub identity: Option<harden::Identity>,
}

impl Config {
    /// A configuration serving `modules` on `listen` with every other
    /// setting at its default (the CLI's defaults).
    pub fn new(listen: crate::Address, modules: Vec<ModuleSpec>) -> Config {
        Config {
            listen,
            modules,
            dirs: Vec::new(),
            settings: settings::SettingSpecs::default(),
            max_frame: crate::protocol::DEFAULT_MAX_FRAME,
            hung_timeout: DEFAULT_HUNG_TIMEOUT,
            max_workers: DEFAULT_MAX_WORKERS,
            seccomp: seccomp::Mode::Errno,
            identity: None,
        }
    }
}

/// Default of [`Config::hung_timeout`]: five minutes.
pub const DEFAULT_HUNG_TIMEOUT: Duration = Duration::from_secs(300);

/// Default of [`Config::max_workers`].
pub const DEFAULT_MAX_WORKERS: usize = 256;

/// A module to serve: `NAME=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSpec {
    /// The name clients ask for in their hello.
    pub name: String,
    /// Path of the `.wasm` (or `.wat`) file.
    pub path: PathBuf,
}

impl FromStr for ModuleSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, path) = s
            .split_once('=')
            .ok_or_else(|| format!("module `{s}` is not of the form NAME=PATH"))?;
        if name.is_empty() || path.is_empty() {
            return Err(format!("module `{s}` is not of the form NAME=PATH"));
        }
        // Other flags name modules before a `:` or `=`; keep names plain.
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            return Err(format!(
                "module name `{name}` may hold only letters, digits, `-`, `_` and `.`"
            ));
        }
        Ok(ModuleSpec { name: name.to_owned(), path: PathBuf::from(path) })
    }
}

/// A host directory preopened for guests: `[MODULE=]HOST:GUEST[:ro|:rw]`.
///
/// Without `MODULE=` the directory is given to every module. The default
/// access is read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirSpec {
    /// The module that gets this directory, or all when `None`.
    pub module: Option<String>,
    /// Directory on the host.
    pub host: PathBuf,
    /// Path under which the guest sees it.
    pub guest: String,
    /// Whether the guest may create, change and remove files in it.
    pub writable: bool,
}

impl DirSpec {
    /// Whether this directory is given to the module named `module`.
    pub fn applies_to(&self, module: &str) -> bool {
        self.module.as_deref().is_none_or(|m| m == module)
    }
}

impl FromStr for DirSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("directory `{s}` is not of the form [MODULE=]HOST:GUEST[:ro|:rw]");
        let (module, rest) = match s.split_once('=') {
            Some((m, rest)) if !m.is_empty() && !m.contains(':') => (Some(m.to_owned()), rest),
            _ => (None, s),
        };
        let (rest, writable) = match rest.rsplit_once(':') {
            Some((rest, "ro")) => (rest, false),
            Some((rest, "rw")) => (rest, true),
            _ => (rest, false),
        };
        let (host, guest) = rest.split_once(':').ok_or_else(bad)?;
        if host.is_empty() || guest.is_empty() {
            return Err(bad());
        }
        Ok(DirSpec { module, host: PathBuf::from(host), guest: guest.to_owned(), writable })
    }
}

impl fmt::Display for DirSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(m) = &self.module {
            write!(f, "{m}=")?;
        }
        let mode = if self.writable { "rw" } else { "ro" };
        write!(f, "{}:{}:{mode}", self.host.display(), self.guest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_spec_parses_module_and_mode() {
        let d: DirSpec = "lookup=data:/data:ro".parse().unwrap();
        assert_eq!(d.module.as_deref(), Some("lookup"));
        assert_eq!(
            (d.host.to_str().unwrap(), d.guest.as_str(), d.writable),
            ("data", "/data", false)
        );

        let d: DirSpec = "/tmp/x:/scratch:rw".parse().unwrap();
        assert_eq!((d.module, d.writable, d.guest.as_str()), (None, true, "/scratch"));

        let d: DirSpec = "a:b".parse().unwrap();
        assert!(!d.writable && d.applies_to("anything"));
        assert!("nothing".parse::<DirSpec>().is_err());
    }

    #[test]
    fn module_spec_needs_name_and_path() {
        let m: ModuleSpec = "hasher=target/h.wasm".parse().unwrap();
        assert_eq!(m.name, "hasher");
        assert!("hasher".parse::<ModuleSpec>().is_err());
        assert!("=x.wasm".parse::<ModuleSpec>().is_err());
        let err = "a:b=x.wasm".parse::<ModuleSpec>().unwrap_err();
        assert!(err.contains("module name `a:b`"), "{err}");
    }
}
