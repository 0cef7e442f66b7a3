//! The `wasm-task` command: runs the daemon.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wasm_task::Address;
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

    /// Largest frame accepted from a client or sent to it, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_FRAME)]
    max_frame: usize,

    /// Largest linear memory a guest may grow to, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    max_memory_mib: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let result = match cli.command {
        Command::Serve(args) => daemon::serve(Config {
            listen: args.listen,
            modules: args.modules,
            dirs: args.dirs,
            max_frame: args.max_frame,
            max_memory: args.max_memory_mib << 20,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wasm-task: {e:#}");
            ExitCode::FAILURE
        }
    }
}
