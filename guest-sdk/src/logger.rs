//! A `log` backend that hands every record to the daemon.

use log::{LevelFilter, Log, Metadata, Record};

use crate::host;

/// Forwards records to the daemon's `log` import.
///
/// It keeps every level: the daemon and the client decide what to show.
struct HostLogger;

impl Log for HostLogger {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &Record<'_>) {
        // A message without arguments needs no formatting, so no allocation.
        match record.args().as_str() {
            Some(text) => host::log(record.level(), record.target(), text),
            None => host::log(record.level(), record.target(), &record.args().to_string()),
        }
    }

    fn flush(&self) {}
}

/// Makes [`HostLogger`] the `log` backend, unless the guest installed its own.
pub(crate) fn install() {
    static LOGGER: HostLogger = HostLogger;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Trace);
    }
}
