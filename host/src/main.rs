//! The `wasm-task` command: runs the daemon.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use wasm_task::Address;

use wasm_task::daemon::harden::Identity;
use wasm_task::daemon::seccomp::Mode;
use wasm_task::daemon::settings::{
    self, ArgSpec, EnvSpec, Limit, LimitSpec, SeedSpec, SettingSpecs, SpawnSpec,
};
use wasm_task::daemon::{self, Config, DirSpec, ModuleSpec};
use wasm_task::protocol::DEFAULT_MAX_FRAME;

/// A WebAssembly-sandboxed worker pool daemon.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve guest modules: fork one sandboxed worker per client connection.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Where to listen: `unix:PATH` or `tcp:HOST:PORT`.
    #[arg(long, value_name = "ADDRESS")]
    listen: Address,

    /// A module to serve, as `NAME=PATH` (a .wasm or .wat file); repeatable.
    #[arg(long = "module", value_name = "NAME=PATH", required = true)]
    modules: Vec<ModuleSpec>,

    /// Preopen a host directory for guests: `[MODULE=]HOST:GUEST[:ro|:rw]`
    /// (read-only unless `:rw`; every module unless `MODULE=`); repeatable.
    #[arg(long = "dir", value_name = "SPEC")]
    dirs: Vec<DirSpec>,

    /// A limit for guests: `[MODULE:]NAME=VALUE` with NAME one of memory,
    /// memories, tables, table-elements, fuel, stack, output, files,
    /// host-memory (sizes take KiB, MiB, GiB); a module's own limit beats
    /// one for all; repeatable. See docs/security.md.
    #[arg(long = "limit", value_name = "SPEC")]
    limits: Vec<LimitSpec>,

    /// An environment variable for guests: `[MODULE:]KEY=VALUE`; guests get
    /// none but these; repeatable.
    #[arg(long = "env", value_name = "SPEC")]
    env: Vec<EnvSpec>,

    /// A command-line argument for a module's guests: `MODULE:VALUE`, in
    /// order (the first is the program name the guest sees); repeatable.
    #[arg(long = "arg", value_name = "MODULE:VALUE")]
    args: Vec<ArgSpec>,

    /// Run guests deterministically: `[MODULE:]SEED` fixes their clocks and
    /// seeds their random numbers with SEED; repeatable.
    #[arg(long = "deterministic", value_name = "SPEC")]
    deterministic: Vec<SeedSpec>,

    /// How workers start: `[MODULE:]zygote` (forked from a process that ran
    /// the guest's init hook once; the default) or `[MODULE:]fork` (each
    /// worker instantiates and initializes the guest itself); repeatable.
    #[arg(long = "spawn", value_name = "SPEC")]
    spawn: Vec<SpawnSpec>,

    /// Largest frame accepted from a client or sent to it, in bytes (at
    /// most 4294967295, what a frame's length prefix can say).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_FRAME,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=u32::MAX as u64))]
    max_frame: usize,

    /// Largest linear memory a guest may grow to, in MiB (default 64); the
    /// same as `--limit memory=MIBMiB` given first.
    #[arg(long, value_name = "MIB")]
    max_memory_mib: Option<usize>,

    /// Longest a worker may stay in one guest entry whatever the client's
    /// deadline (e.g. 300s, 1.5s, 250ms); past it the guest is interrupted
    /// and, if stuck in a host call, the worker ends itself.
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = settings::duration)]
    hung_timeout: Duration,

    /// Most worker processes alive at once; further connections wait in the
    /// listen backlog until a worker exits.
    #[arg(long, value_name = "N", default_value_t = daemon::DEFAULT_MAX_WORKERS)]
    max_workers: usize,

    /// What a worker's system-call filter does with a forbidden call:
    /// `errno` (it fails with EPERM), `kill` (the worker dies of SIGSYS) or
    /// `off` (no filter).
    #[arg(long, value_name = "MODE", default_value = "errno")]
    seccomp: Mode,

    /// Run workers as this user (name or uid); needs the daemon to run as root.
    #[arg(long, value_name = "USER")]
    user: Option<String>,

    /// Run workers with this group (name or gid) instead of the user's own.
    #[arg(long, value_name = "GROUP", requires = "user")]
    group: Option<String>,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        let identity = match &self.user {
            Some(user) => {
                Some(Identity::resolve(user, self.group.as_deref()).map_err(anyhow::Error::msg)?)
            }
            None => None,
        };
        let mut limits = self.limits;
        if let Some(mib) = self.max_memory_mib {
            let bytes = mib
                .checked_mul(1 << 20)
                .ok_or_else(|| anyhow::anyhow!("--max-memory-mib {mib} is too large"))?;
            limits.insert(0, LimitSpec { module: None, limit: Limit::Memory(bytes) });
        }
        let settings = SettingSpecs {
            limits,
            env: self.env,
            args: self.args,
            seeds: self.deterministic,
            spawn: self.spawn,
        };
        Ok(Config {
            dirs: self.dirs,
            settings,
            max_frame: self.max_frame,
            hung_timeout: self.hung_timeout,
            max_workers: self.max_workers,
            seccomp: self.seccomp,
            identity,
            ..Config::new(self.listen, self.modules)
        })
    }
}

/// Logging without `RUST_LOG`: the daemon's lifecycle at info; wasmtime-wasi
/// only at error, since it warns once per call of some unsupported WASI
/// functions, which would let a guest flood the daemon's log.
const DEFAULT_LOG_FILTER: &str = "info,wasmtime_wasi=error";

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let result = match cli.command {
        Command::Serve(args) => args.into_config().and_then(daemon::serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wasm-task: {e:#}");
            ExitCode::FAILURE
        }
    }
}
