//! Reporting panics to the daemon.
//!
//! wasm32-wasip1 aborts on panic, which the daemon sees as a trap with no
//! explanation; the hook gives it the panic's message and location first.

use std::panic::{self, PanicHookInfo};

use crate::host;

/// Installs a panic hook that sends the panic's description to the daemon.
///
/// Natively it also runs the previous hook, so that a failing unit test
/// still prints why; in wasm the daemon's report replaces stderr's.
pub(crate) fn install() {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        host::trap_message(&describe(info));
        if cfg!(not(target_family = "wasm")) {
            previous(info);
        }
    }));
}

/// One line: where the panic happened and what it said.
fn describe(info: &PanicHookInfo<'_>) -> String {
    let message = info.payload_as_str().unwrap_or("(a panic without a message)");
    match info.location() {
        Some(location) => format!("panicked at {location}: {message}"),
        None => format!("panicked: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn description_has_message_and_location() {
        let seen = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&seen);
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| *sink.lock().unwrap() = describe(info)));
        let line = line!() + 1;
        let _ = panic::catch_unwind(|| panic!("the answer is {}", 42));
        panic::set_hook(previous);

        let seen = seen.lock().unwrap().clone();
        let expected = format!("panicked at {}:{line}:", file!());
        assert!(seen.starts_with(&expected), "{seen}");
        assert!(seen.ends_with(": the answer is 42"), "{seen}");
    }
}
