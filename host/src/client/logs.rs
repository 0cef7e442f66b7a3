//! Re-emits the log records a guest made as `tracing` events in the client.

use tracing::Level;

use crate::protocol::LogRecord;

/// Where a batch of log records came from.
pub(crate) struct Origin<'a> {
    /// Process id of the worker.
    pub(crate) pid: u32,
    /// The module the worker runs.
    pub(crate) module: &'a str,
    /// The method (or hook) during which the guest logged.
    pub(crate) method: &'a str,
}

/// Emits each record as an event at the record's level.
///
/// The event's target is this module; the guest's own target travels as the
/// `target` field, next to `worker.pid`, `module`, `method` and `at_us`.
pub(crate) fn emit(origin: &Origin<'_>, records: &[LogRecord]) {
    for record in records {
        emit_one(origin, record);
    }
}

/// Maps the `log` crate's numbering (1 error .. 5 trace) onto `tracing` levels.
/// Out-of-range values are clamped to the nearest level.
fn level(record: &LogRecord) -> Level {
    match record.level {
        0 | 1 => Level::ERROR,
        2 => Level::WARN,
        3 => Level::INFO,
        4 => Level::DEBUG,
        _ => Level::TRACE,
    }
}

/// `tracing` wants the level as a constant, hence one arm per level.
macro_rules! guest_event {
    ($level:expr, $origin:expr, $record:expr) => {
        tracing::event!(
            $level,
            worker.pid = $origin.pid,
            module = $origin.module,
            method = $origin.method,
            target = $record.target.as_str(),
            at_us = $record.at_us,
            "{}",
            $record.message
        )
    };
}

fn emit_one(origin: &Origin<'_>, record: &LogRecord) {
    match level(record) {
        Level::ERROR => guest_event!(Level::ERROR, origin, record),
        Level::WARN => guest_event!(Level::WARN, origin, record),
        Level::INFO => guest_event!(Level::INFO, origin, record),
        Level::DEBUG => guest_event!(Level::DEBUG, origin, record),
        _ => guest_event!(Level::TRACE, origin, record),
    }
}
