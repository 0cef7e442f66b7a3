//! Process titles, so that `ps` tells the daemon and its workers apart.
//!
//! Linux shows two names: the short `comm` (15 bytes, set with prctl; `ps -e`,
//! `top`) and the command line (`ps aux`), read from the memory that held the
//! original argv. Both are rewritten here.

use std::ffi::CString;
use std::sync::OnceLock;

/// Sets the process title to `title` (full) and `comm` (short name).
///
/// The command line can only be as long as the original one; a longer title
/// is cut. Best effort: a failure leaves the old title.
pub fn set(title: &str, comm: &str) {
    let short: String = comm.chars().filter(|c| *c != '\0').take(15).collect();
    if let Ok(name) = CString::new(short) {
        let _ = nix::sys::prctl::set_name(&name);
    }
    if let Some((start, end)) = *ARGV_AREA.get_or_init(argv_area) {
        let len = end - start;
        let bytes = title.as_bytes();
        let n = bytes.len().min(len.saturating_sub(1));
        // SAFETY: [start, end) is this process's original argv block, as the
        // kernel reports it; it is ordinary writable memory that nothing else
        // here reads once the command line has been parsed at start-up.
        unsafe {
            let area = std::slice::from_raw_parts_mut(start as *mut u8, len);
            area[..n].copy_from_slice(&bytes[..n]);
            area[n..].fill(0);
        }
    }
}

/// Where the argv strings are; found once, in the daemon, and inherited by
/// every worker, which then sets its title without reading /proc.
static ARGV_AREA: OnceLock<Option<(usize, usize)>> = OnceLock::new();

/// Finds the argv block now, before any fork, so that workers need not.
pub fn prepare() {
    ARGV_AREA.get_or_init(argv_area);
}

/// The address range of the argv strings: fields 48 and 49 of `/proc/self/stat`.
fn argv_area() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(48 - 3);
    let start = fields.next()?.parse().ok()?;
    let end: usize = fields.next()?.parse().ok()?;
    (start != 0 && end > start).then_some((start, end))
}
