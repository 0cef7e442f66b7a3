//! A worker that answers "what is the capital of ..." from a table on disk.
//!
//! The daemon gives the guest one host directory, preopened read-only at
//! `/data` (`--dir lookup=examples/lookup/data:/data:ro`). The setup hook
//! loads `/data/capitals.tsv` once per worker; the methods then answer from
//! memory. Two methods touch `/data` on every call, and do it carelessly on
//! purpose, to show what the sandbox holds when guest code does not.

use std::collections::HashMap;
use std::fs;
use std::sync::OnceLock;

use serde::Deserialize;
use wasm_task_guest::{export, log};

/// The directory the daemon preopens for this guest.
const DATA_DIR: &str = "/data";

/// The table loaded by [`setup`]: a header line, then `country<TAB>capital`.
const TABLE: &str = "/data/capitals.tsv";

/// The header line [`TABLE`] must start with.
const HEADER: &str = "country\tcapital";

/// Capitals keyed by lower-cased country name, loaded once by [`setup`].
static CAPITALS: OnceLock<HashMap<String, String>> = OnceLock::new();

/// Loads [`TABLE`]; a worker that cannot is refused, with the file's name.
fn setup() -> Result<(), String> {
    let text = fs::read_to_string(TABLE).map_err(|e| format!("reading {TABLE}: {e}"))?;
    let capitals = parse(&text).map_err(|e| format!("parsing {TABLE}: {e}"))?;
    log::info!("loaded {} capitals from {TABLE}", capitals.len());
    CAPITALS.set(capitals).map_err(|_| "setup ran twice in one worker".to_owned())
}

/// Parses the table's text into capitals keyed by lower-cased country.
fn parse(text: &str) -> Result<HashMap<String, String>, String> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, HEADER)) => {}
        Some((_, other)) => return Err(format!("expected the header {HEADER:?}, found {other:?}")),
        None => return Err("the file is empty".to_owned()),
    }

    let mut capitals = HashMap::new();
    for (index, line) in lines.filter(|(_, line)| !line.trim().is_empty()) {
        let (country, capital) = line
            .split_once('\t')
            .ok_or_else(|| format!("line {}: expected country<TAB>capital", index + 1))?;
        capitals.insert(country.trim().to_lowercase(), capital.trim().to_owned());
    }
    Ok(capitals)
}

/// The loaded table; an error if setup has not run.
fn capitals() -> Result<&'static HashMap<String, String>, String> {
    CAPITALS.get().ok_or_else(|| "no capitals loaded: the setup hook has not run".to_owned())
}

/// The capital of `country` (any case), or `None` if the table lacks it.
fn lookup(country: String) -> Result<Option<String>, String> {
    let capital = capitals()?.get(&country.trim().to_lowercase()).cloned();
    log::debug!("lookup {country:?}: {capital:?}");
    Ok(capital)
}

/// How many countries the table has.
fn count(_: ()) -> Result<usize, String> {
    Ok(capitals()?.len())
}

/// Reads `/data/{name}` as text.
///
/// The path is joined naively, without rejecting `..` or symlinks: that is
/// deliberate. Tests send `../../etc/passwd` and names of symlinks that point
/// out of the directory to show that the WASI sandbox, not the guest's
/// care, keeps the guest inside `/data`.
fn get_file(name: String) -> Result<String, String> {
    let path = format!("{DATA_DIR}/{name}");
    fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))
}

/// Arguments of [`put_file`].
#[derive(Debug, Deserialize)]
struct PutFile {
    /// File name under `/data`, joined as naively as in [`get_file`].
    name: String,
    /// The text to write.
    contents: String,
}

/// Writes `/data/{name}`; fails when `/data` is preopened read-only.
fn put_file(args: PutFile) -> Result<(), String> {
    let path = format!("{DATA_DIR}/{}", args.name);
    fs::write(&path, args.contents).map_err(|e| format!("writing {path}: {e}"))
}

export! {
    methods: {
        "lookup" => lookup,
        "count" => count,
        "get_file" => get_file,
        "put_file" => put_file,
    },
    setup: setup,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_keys_by_lower_case_country() {
        let capitals = parse("country\tcapital\nNew Zealand\tWellington\n\nPeru\tLima\n").unwrap();
        assert_eq!(capitals.len(), 2);
        assert_eq!(capitals["new zealand"], "Wellington");
    }

    #[test]
    fn parse_rejects_a_missing_header_and_bad_lines() {
        assert!(parse("").unwrap_err().contains("empty"));
        assert!(parse("Peru\tLima\n").unwrap_err().contains("header"));
        let err = parse("country\tcapital\nPeru Lima\n").unwrap_err();
        assert_eq!(err, "line 2: expected country<TAB>capital");
    }

    #[test]
    fn shipped_table_parses() {
        let text = include_str!("../../data/capitals.tsv");
        let capitals = parse(text).unwrap();
        assert_eq!(capitals.len(), text.lines().count() - 1);
        assert_eq!(capitals["united states"], "Washington, D.C.");
        assert_eq!(capitals["iceland"], "Reykjavík");
    }
}
