//! Loading, checking and pre-linking the modules the daemon serves.
//!
//! Everything here runs in the parent before the first fork, so every worker
//! inherits compiled code and starts by instantiating, never by compiling.

use std::path::Path;

use anyhow::{Context, bail};
use wasmtime::{Config as EngineConfig, Engine, ExternType, InstancePre, Linker, Module, ValType};

use super::guest::{self, HostState};
use super::{Config, DirSpec};

/// A module compiled, checked and linked, ready to instantiate in a worker.
pub struct LoadedModule {
    /// The name clients ask for.
    pub name: String,
    /// Pre-resolved imports; instantiating from it is cheap.
    pub pre: InstancePre<HostState>,
    /// Directories this module's guests get.
    pub dirs: Vec<DirSpec>,
    /// Which optional exports the module has.
    pub exports: OptionalExports,
}

/// The optional parts of the ABI a module implements.
#[derive(Debug, Clone, Copy, Default)]
pub struct OptionalExports {
    /// `_initialize`, the WASI reactor initializer.
    pub initialize: bool,
    /// `wasm_task_setup`.
    pub setup: bool,
    /// `wasm_task_checkout_done`.
    pub checkout_done: bool,
    /// `wasm_task_methods`.
    pub methods: bool,
}

/// All modules of one daemon, sharing one engine.
pub struct Modules {
    /// The engine every module was compiled with.
    pub engine: Engine,
    /// The modules, in command-line order.
    pub modules: Vec<LoadedModule>,
    /// Largest linear memory a guest may grow to.
    pub max_memory: usize,
}

impl Modules {
    /// Compiles and checks every module named in `config`.
    ///
    /// Fails on the first module that is missing, is not wasm, lacks a
    /// required export, or imports something the daemon does not provide;
    /// the error names the file and the problem.
    pub fn load(config: &Config) -> anyhow::Result<Modules> {
        let engine = new_engine()?;
        let mut linker = Linker::new(&engine);
        guest::add_imports(&mut linker)?;

        let mut modules: Vec<LoadedModule> = Vec::new();
        for spec in &config.modules {
            if modules.iter().any(|m| m.name == spec.name) {
                bail!("module name `{}` is given twice", spec.name);
            }
            let (pre, exports) = load_one(&engine, &linker, &spec.path)
                .and_then(|loaded| {
                    check_memory(&loaded.0, &spec.path, config.max_memory).map(|()| loaded)
                })
                .with_context(|| format!("loading module `{}`", spec.name))?;
            let dirs = config.dirs.iter().filter(|d| d.applies_to(&spec.name)).cloned().collect();
            modules.push(LoadedModule { name: spec.name.clone(), pre, dirs, exports });
        }
        for dir in &config.dirs {
            check_dir(dir, &modules)?;
        }
        Ok(Modules { engine, modules, max_memory: config.max_memory })
    }

    /// The module called `name`, if the daemon serves it.
    pub fn get(&self, name: &str) -> Option<&LoadedModule> {
        self.modules.iter().find(|m| m.name == name)
    }
}

/// The engine configuration every worker relies on.
fn new_engine() -> anyhow::Result<Engine> {
    let mut config = EngineConfig::new();
    // Deadlines are enforced by bumping the epoch from the worker's watchdog.
    config.epoch_interruption(true);
    // Compilation happens before any fork and must leave no threads behind,
    // since fork() carries only the calling thread into the child: the crate
    // is built without wasmtime's `parallel-compilation` feature for that.
    Ok(Engine::new(&config)?)
}

fn load_one(
    engine: &Engine,
    linker: &Linker<HostState>,
    path: &Path,
) -> anyhow::Result<(InstancePre<HostState>, OptionalExports)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let module = Module::new(engine, &bytes)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("{} is not a valid wasm module or WAT text", path.display()))?;
    let exports = check_exports(&module).with_context(|| {
        format!(
            "{} does not implement the wasm-task guest ABI v1 (see docs/abi.md)",
            path.display()
        )
    })?;
    let pre = linker.instantiate_pre(&module).map_err(anyhow::Error::from).with_context(|| {
        format!("{} imports something the daemon does not provide", path.display())
    })?;
    Ok((pre, exports))
}

const I32: &[ValType] = &[ValType::I32];

/// Checks the exports the ABI requires and notes the optional ones.
fn check_exports(module: &Module) -> anyhow::Result<OptionalExports> {
    match module.get_export("memory") {
        Some(ExternType::Memory(_)) => {}
        Some(_) => bail!("export `memory` is not a memory"),
        None => bail!("missing export `memory`"),
    }
    require_func(module, "wasm_task_abi_v1", &[], &[])?;
    if let Some(other) = module
        .exports()
        .map(|e| e.name())
        .find(|n| n.starts_with("wasm_task_abi_v") && *n != "wasm_task_abi_v1")
    {
        bail!("exports both `wasm_task_abi_v1` and `{other}`; a module declares one ABI version");
    }
    require_func(module, "wasm_task_alloc", I32, I32)?;
    require_func(module, "wasm_task_call", &[ValType::I32, ValType::I32, ValType::I32], I32)?;
    Ok(OptionalExports {
        initialize: optional_func(module, "_initialize", &[], &[])?,
        setup: optional_func(module, "wasm_task_setup", &[], I32)?,
        checkout_done: optional_func(module, "wasm_task_checkout_done", &[], I32)?,
        methods: optional_func(module, "wasm_task_methods", &[], I32)?,
    })
}

fn require_func(
    module: &Module,
    name: &str,
    params: &[ValType],
    results: &[ValType],
) -> anyhow::Result<()> {
    if !optional_func(module, name, params, results)? {
        bail!("missing export `{name}`");
    }
    Ok(())
}

/// Whether `module` exports function `name`; an error if it does with another type.
fn optional_func(
    module: &Module,
    name: &str,
    params: &[ValType],
    results: &[ValType],
) -> anyhow::Result<bool> {
    let Some(export) = module.get_export(name) else { return Ok(false) };
    let ExternType::Func(ty) = export else { bail!("export `{name}` is not a function") };
    let same = |got: &mut dyn ExactSizeIterator<Item = ValType>, want: &[ValType]| {
        got.len() == want.len() && got.zip(want).all(|(a, b)| ValType::eq(&a, b))
    };
    if !same(&mut ty.params(), params) || !same(&mut ty.results(), results) {
        bail!("export `{name}` has type {ty}, expected {}", describe(params, results));
    }
    Ok(true)
}

fn describe(params: &[ValType], results: &[ValType]) -> String {
    let list = |kind: &str, v: &[ValType]| {
        let types: Vec<_> = v.iter().map(|t| t.to_string()).collect();
        if types.is_empty() { String::new() } else { format!(" ({kind} {})", types.join(" ")) }
    };
    format!("(func{}{})", list("param", params), list("result", results))
}

/// A module whose memory starts above the limit could never be instantiated.
fn check_memory(
    pre: &InstancePre<HostState>,
    path: &Path,
    max_memory: usize,
) -> anyhow::Result<()> {
    for export in pre.module().exports() {
        if let ExternType::Memory(memory) = export.ty() {
            let initial = memory.minimum().saturating_mul(memory.page_size());
            if initial > max_memory as u64 {
                bail!(
                    "{}: memory `{}` starts at {} MiB, above the {} MiB limit",
                    path.display(),
                    export.name(),
                    initial >> 20,
                    max_memory >> 20
                );
            }
        }
    }
    Ok(())
}

/// A preopen must name a served module and an existing host directory.
fn check_dir(dir: &DirSpec, modules: &[LoadedModule]) -> anyhow::Result<()> {
    if let Some(name) = &dir.module
        && !modules.iter().any(|m| &m.name == name)
    {
        bail!("directory {dir} is for module `{name}`, which is not served");
    }
    if !dir.host.is_dir() {
        bail!("directory {dir}: {} is not a directory", dir.host.display());
    }
    Ok(())
}
