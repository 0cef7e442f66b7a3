//! Per-module sandbox settings: limits, environment, arguments and
//! determinism, as given on the command line and resolved for each module.
//!
//! Every setting can be given for all modules or for one (`MODULE:` in front).
//! A module's own setting beats one given for all; among settings of the same
//! scope the last one given wins.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// What one module's guests may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest size of one linear memory, in bytes (default 64 MiB).
    pub memory: usize,
    /// Most linear memories one instance may have (default 1).
    pub memories: usize,
    /// Most tables one instance may have (default 4).
    pub tables: usize,
    /// Largest number of elements in one table (default 100 000).
    pub table_elements: usize,
    /// Fuel granted to each guest entry (a call or a hook); `None` runs
    /// without fuel metering (the default).
    pub fuel: Option<u64>,
    /// Largest wasm call stack, in bytes (default 512 KiB).
    pub stack: usize,
    /// Bytes of stdout and of stderr kept per call (default 64 KiB each).
    pub output: usize,
    /// Highest number of open descriptors of a worker, host's included
    /// (`RLIMIT_NOFILE`; default 256).
    pub files: u64,
    /// Address space a worker may map beyond what it holds when the guest
    /// is instantiated plus the reservations of its linear memories
    /// (`RLIMIT_AS`; default 1 GiB).
    pub host_memory: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            memory: 64 << 20,
            memories: 1,
            tables: 4,
            table_elements: 100_000,
            fuel: None,
            stack: 512 << 10,
            output: 64 << 10,
            files: 256,
            host_memory: 1 << 30,
        }
    }
}

/// Smallest and largest wasm stack the daemon accepts, in bytes. The upper
/// bound leaves room on the worker's 8 MiB main-thread stack for the host.
pub const STACK_RANGE: (usize, usize) = (16 << 10, 4 << 20);

/// Fewest open descriptors a worker needs for itself.
pub const MIN_FILES: u64 = 32;

/// One limit and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `memory=SIZE`
    Memory(usize),
    /// `memories=N`
    Memories(usize),
    /// `tables=N`
    Tables(usize),
    /// `table-elements=N`
    TableElements(usize),
    /// `fuel=N` or `fuel=none`
    Fuel(Option<u64>),
    /// `stack=SIZE`
    Stack(usize),
    /// `output=SIZE`
    Output(usize),
    /// `files=N`
    Files(u64),
    /// `host-memory=SIZE`
    HostMemory(u64),
}

/// Names of the limits, as written on the command line.
pub const LIMIT_NAMES: &[&str] = &[
    "memory",
    "memories",
    "tables",
    "table-elements",
    "fuel",
    "stack",
    "output",
    "files",
    "host-memory",
];

impl Limit {
    fn parse(name: &str, value: &str) -> Result<Limit, String> {
        let limit = match name {
            "memory" => Limit::Memory(size(value)?),
            "memories" => Limit::Memories(count(value)?),
            "tables" => Limit::Tables(count(value)?),
            "table-elements" => Limit::TableElements(count(value)?),
            "fuel" if value == "none" => Limit::Fuel(None),
            "fuel" => Limit::Fuel(Some(count(value)?)),
            "stack" => Limit::Stack(size(value)?),
            "output" => Limit::Output(size(value)?),
            "files" => Limit::Files(count(value)?),
            "host-memory" => Limit::HostMemory(size(value)?),
            _ => {
                return Err(format!("unknown limit `{name}` (known: {})", LIMIT_NAMES.join(", ")));
            }
        };
        limit.check()?;
        Ok(limit)
    }

    /// Refuses values no worker could run with.
    fn check(self) -> Result<(), String> {
        let (lo, hi) = STACK_RANGE;
        match self {
            Limit::Memory(0) => Err("memory must be above 0".into()),
            Limit::Stack(s) if !(lo..=hi).contains(&s) => {
                Err(format!("stack of {s} bytes is outside {} KiB ..= {} KiB", lo >> 10, hi >> 10))
            }
            Limit::Files(n) if n < MIN_FILES => {
                Err(format!("files={n} is below the {MIN_FILES} a worker needs for itself"))
            }
            _ => Ok(()),
        }
    }
}

impl Limits {
    fn apply(&mut self, limit: Limit) {
        match limit {
            Limit::Memory(v) => self.memory = v,
            Limit::Memories(v) => self.memories = v,
            Limit::Tables(v) => self.tables = v,
            Limit::TableElements(v) => self.table_elements = v,
            Limit::Fuel(v) => self.fuel = v,
            Limit::Stack(v) => self.stack = v,
            Limit::Output(v) => self.output = v,
            Limit::Files(v) => self.files = v,
            Limit::HostMemory(v) => self.host_memory = v,
        }
    }
}

/// `--limit [MODULE:]NAME=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSpec {
    /// The module it applies to, or every module when `None`.
    pub module: Option<String>,
    /// The limit.
    pub limit: Limit,
}

impl FromStr for LimitSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scope, value) = s
            .split_once('=')
            .ok_or_else(|| format!("limit `{s}` is not of the form [MODULE:]NAME=VALUE"))?;
        let (module, name) = scoped(scope);
        let limit = Limit::parse(name, value).map_err(|e| format!("limit `{s}`: {e}"))?;
        Ok(LimitSpec { module, limit })
    }
}

/// `--env [MODULE:]KEY=VALUE`: an environment variable for guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvSpec {
    /// The module that gets it, or every module when `None`.
    pub module: Option<String>,
    /// Variable name.
    pub key: String,
    /// Its value.
    pub value: String,
}

impl FromStr for EnvSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("environment variable `{s}` is not of the form [MODULE:]KEY=VALUE");
        let (scope, value) = s.split_once('=').ok_or_else(bad)?;
        let (module, key) = scoped(scope);
        if key.is_empty() || key.contains('\0') || value.contains('\0') {
            return Err(bad());
        }
        Ok(EnvSpec { module, key: key.to_owned(), value: value.to_owned() })
    }
}

/// `--arg MODULE:VALUE`: one command-line argument for a module's guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgSpec {
    /// The module that gets it.
    pub module: String,
    /// The argument.
    pub value: String,
}

impl FromStr for ArgSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((module, value)) if !module.is_empty() && !value.contains('\0') => {
                Ok(ArgSpec { module: module.to_owned(), value: value.to_owned() })
            }
            _ => Err(format!("argument `{s}` is not of the form MODULE:VALUE")),
        }
    }
}

/// `--deterministic [MODULE:]SEED`: fixed clocks and seeded random numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSpec {
    /// The module that runs deterministically, or every module when `None`.
    pub module: Option<String>,
    /// Seed of the guest's random numbers.
    pub seed: u64,
}

impl FromStr for SeedSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (module, seed) = scoped(s);
        let seed = count(seed).map_err(|e| format!("deterministic seed `{s}`: {e}"))?;
        Ok(SeedSpec { module, seed })
    }
}

/// How the daemon starts a module's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Spawn {
    /// From the module's zygote: a process that instantiated the guest and
    /// ran its `init` hook once; each worker is forked from it with that
    /// state (the default).
    #[default]
    Zygote,
    /// Straight from the daemon: each worker instantiates the guest and runs
    /// `init` itself.
    Fork,
}

impl fmt::Display for Spawn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Spawn::Zygote => "zygote",
            Spawn::Fork => "fork",
        })
    }
}

/// `--spawn [MODULE:]zygote|fork`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnSpec {
    /// The module it applies to, or every module when `None`.
    pub module: Option<String>,
    /// How its workers start.
    pub spawn: Spawn,
}

impl FromStr for SpawnSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (module, mode) = scoped(s);
        let spawn = match mode {
            "zygote" => Spawn::Zygote,
            "fork" => Spawn::Fork,
            _ => return Err(format!("spawn mode `{s}` is not of the form [MODULE:]zygote|fork")),
        };
        Ok(SpawnSpec { module, spawn })
    }
}

/// Splits `MODULE:REST` from `REST`; module names hold no `:`.
fn scoped(s: &str) -> (Option<String>, &str) {
    match s.split_once(':') {
        Some((module, rest)) => (Some(module.to_owned()), rest),
        None => (None, s),
    }
}

/// Everything the daemon was told about one module's sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModuleSettings {
    /// Resource limits.
    pub limits: Limits,
    /// Environment variables, in the order given.
    pub env: Vec<(String, String)>,
    /// Arguments, in the order given (the first is what the guest sees as
    /// its program name).
    pub args: Vec<String>,
    /// Seed for deterministic runs: fixed clocks, seeded random numbers.
    pub seed: Option<u64>,
    /// Whether workers start from a zygote or a plain fork.
    pub spawn: Spawn,
}

/// The command-line settings of every scope, before resolution.
#[derive(Debug, Clone, Default)]
pub struct SettingSpecs {
    /// `--limit` values, in command-line order.
    pub limits: Vec<LimitSpec>,
    /// `--env` values, in command-line order.
    pub env: Vec<EnvSpec>,
    /// `--arg` values, in command-line order.
    pub args: Vec<ArgSpec>,
    /// `--deterministic` values, in command-line order.
    pub seeds: Vec<SeedSpec>,
    /// `--spawn` values, in command-line order.
    pub spawn: Vec<SpawnSpec>,
}

impl SettingSpecs {
    /// The settings of the module called `name`.
    pub fn resolve(&self, name: &str) -> ModuleSettings {
        let mut s = ModuleSettings::default();
        // Settings for every module first, so that a module's own win.
        for own in [false, true] {
            let applies = |m: &Option<String>| match m {
                None => !own,
                Some(m) => own && m == name,
            };
            for spec in self.limits.iter().filter(|l| applies(&l.module)) {
                s.limits.apply(spec.limit);
            }
            for spec in self.env.iter().filter(|e| applies(&e.module)) {
                match s.env.iter_mut().find(|(k, _)| *k == spec.key) {
                    Some(slot) => slot.1.clone_from(&spec.value),
                    None => s.env.push((spec.key.clone(), spec.value.clone())),
                }
            }
            for spec in self.seeds.iter().filter(|d| applies(&d.module)) {
                s.seed = Some(spec.seed);
            }
            for spec in self.spawn.iter().filter(|d| applies(&d.module)) {
                s.spawn = spec.spawn;
            }
        }
        s.args = self.args.iter().filter(|a| a.module == name).map(|a| a.value.clone()).collect();
        s
    }

    /// Every module name the settings mention, with the flag that names it.
    pub fn modules_named(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let limits = self.limits.iter().filter_map(|l| l.module.as_deref()).map(|m| ("--limit", m));
        let env = self.env.iter().filter_map(|e| e.module.as_deref()).map(|m| ("--env", m));
        let args = self.args.iter().map(|a| ("--arg", a.module.as_str()));
        let seeds =
            self.seeds.iter().filter_map(|s| s.module.as_deref()).map(|m| ("--deterministic", m));
        let spawn = self.spawn.iter().filter_map(|s| s.module.as_deref()).map(|m| ("--spawn", m));
        limits.chain(env).chain(args).chain(seeds).chain(spawn)
    }
}

/// A size in bytes: `4096`, `64KiB`, `64MiB`, `2GiB` (`K`, `M`, `G` mean the same).
pub fn size<T: TryFrom<u64>>(s: &str) -> Result<T, String> {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    let shift = match unit {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => return Err(format!("`{s}` is not a size (e.g. 4096, 64KiB, 64MiB, 2GiB)")),
    };
    let n: u64 = count(digits)?;
    let bytes = n.checked_mul(1 << shift).ok_or_else(|| format!("`{s}` is too large"))?;
    T::try_from(bytes).map_err(|_| format!("`{s}` is too large"))
}

/// A whole number; `_` may separate digits.
pub fn count<T: TryFrom<u64>>(s: &str) -> Result<T, String> {
    let digits: String = s.chars().filter(|c| *c != '_').collect();
    let n: u64 = digits.parse().map_err(|_| format!("`{s}` is not a whole number"))?;
    T::try_from(n).map_err(|_| format!("`{s}` is too large"))
}

/// A duration: `300s`, `1.5s`, `250ms`, `5m`; a bare number means seconds.
pub fn duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration (e.g. 300s, 1.5s, 250ms, 5m)");
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    Duration::try_from_secs_f64(value * scale).map_err(|_| bad())
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fuel = self.fuel.map_or("none".to_owned(), |n| n.to_string());
        write!(
            f,
            "memory={} KiB memories={} tables={} table-elements={} fuel={fuel} stack={} KiB \
             output={} KiB files={} host-memory={} MiB",
            self.memory >> 10,
            self.memories,
            self.tables,
            self.table_elements,
            self.stack >> 10,
            self.output >> 10,
            self.files,
            self.host_memory >> 20,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(limits: &[&str], env: &[&str], args: &[&str], seeds: &[&str]) -> SettingSpecs {
        SettingSpecs {
            limits: limits.iter().map(|s| s.parse().unwrap()).collect(),
            env: env.iter().map(|s| s.parse().unwrap()).collect(),
            args: args.iter().map(|s| s.parse().unwrap()).collect(),
            seeds: seeds.iter().map(|s| s.parse().unwrap()).collect(),
            spawn: Vec::new(),
        }
    }

    #[test]
    fn spawn_mode_per_module() {
        let mut s = specs(&[], &[], &[], &[]);
        assert_eq!(s.resolve("a").spawn, Spawn::Zygote);
        s.spawn = vec!["fork".parse().unwrap(), "b:zygote".parse().unwrap()];
        assert_eq!((s.resolve("a").spawn, s.resolve("b").spawn), (Spawn::Fork, Spawn::Zygote));
        assert!("b:sometimes".parse::<SpawnSpec>().is_err());
    }

    #[test]
    fn sizes_counts_and_durations_parse_with_units() {
        assert_eq!(size::<usize>("4096"), Ok(4096));
        assert_eq!(size::<usize>("64KiB"), Ok(64 << 10));
        assert_eq!(size::<usize>("64M"), Ok(64 << 20));
        assert_eq!(size::<u64>("2GiB"), Ok(2 << 30));
        assert!(size::<usize>("64MB").unwrap_err().contains("`64MB` is not a size"));
        assert!(size::<u32>("8GiB").unwrap_err().contains("too large"));
        assert_eq!(count::<u64>("1_000_000"), Ok(1_000_000));
        assert_eq!(duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert!(duration("soon").is_err() && duration("-1s").is_err());
    }

    #[test]
    fn limit_specs_name_the_problem() {
        let l: LimitSpec = "hasher:fuel=1_000".parse().unwrap();
        assert_eq!((l.module.as_deref(), l.limit), (Some("hasher"), Limit::Fuel(Some(1000))));
        let l: LimitSpec = "fuel=none".parse().unwrap();
        assert_eq!((l.module, l.limit), (None, Limit::Fuel(None)));
        let e = "memroy=1M".parse::<LimitSpec>().unwrap_err();
        assert!(e.contains("unknown limit `memroy`") && e.contains("memory,"), "{e}");
        let e = "stack=64MiB".parse::<LimitSpec>().unwrap_err();
        assert!(e.contains("outside"), "{e}");
        let e = "files=3".parse::<LimitSpec>().unwrap_err();
        assert!(e.contains("below"), "{e}");
        assert!("memory".parse::<LimitSpec>().is_err());
    }

    #[test]
    fn a_modules_own_settings_beat_the_global_ones_whatever_the_order() {
        let s = specs(
            &["a:memory=1MiB", "memory=2MiB", "output=1KiB", "output=2KiB"],
            &["a:K=own", "K=all", "L=x"],
            &["a:prog", "b:other", "a:--flag=1"],
            &["7", "b:9"],
        );
        let a = s.resolve("a");
        assert_eq!(a.limits.memory, 1 << 20);
        assert_eq!(a.limits.output, 2 << 10, "last one of the same scope wins");
        assert_eq!(a.env, [("K".to_owned(), "own".to_owned()), ("L".to_owned(), "x".to_owned())]);
        assert_eq!(a.args, ["prog", "--flag=1"]);
        assert_eq!(a.seed, Some(7));

        let b = s.resolve("b");
        assert_eq!(b.limits.memory, 2 << 20);
        assert_eq!(b.env, [("K".to_owned(), "all".to_owned()), ("L".to_owned(), "x".to_owned())]);
        assert_eq!(b.args, ["other"]);
        assert_eq!(b.seed, Some(9));

        let c = s.resolve("c");
        assert!(c.args.is_empty());
        assert_eq!(c.limits.fuel, None);
    }

    #[test]
    fn nothing_is_given_to_guests_by_default() {
        let s = SettingSpecs::default().resolve("m");
        assert!(s.env.is_empty() && s.args.is_empty() && s.seed.is_none());
        assert_eq!(s.limits, Limits::default());
    }

    #[test]
    fn env_and_arg_specs_need_their_parts() {
        let e: EnvSpec = "m:A=b=c".parse().unwrap();
        assert_eq!(
            (e.module.as_deref(), e.key.as_str(), e.value.as_str()),
            (Some("m"), "A", "b=c")
        );
        assert!("=x".parse::<EnvSpec>().is_err());
        assert!("novalue".parse::<EnvSpec>().is_err());
        let a: ArgSpec = "m:a:b".parse().unwrap();
        assert_eq!((a.module.as_str(), a.value.as_str()), ("m", "a:b"));
        assert!("nomodule".parse::<ArgSpec>().is_err());
        assert!("m:x".parse::<SeedSpec>().is_err());
    }
}
