//! Re-emits the log records a guest made as `tracing` events in the client.

use std::fmt;

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
/// `target` field, next to `worker.pid`, `module`, `method`, `at_us` (the
/// record's time from the start of the call, in microseconds) and, when the
/// guest attached key-value fields, `fields` (as `key=value` pairs).
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
            target = tracing::field::display(Escaped(&$record.target)),
            at_us = $record.at_us,
            fields = (!$record.fields.is_empty())
                .then(|| tracing::field::display(Fields(&$record.fields))),
            "{}",
            Escaped(&$record.message)
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

/// A record's key-value fields, shown as `key=value` pairs separated by
/// spaces; a value that is empty or holds a space, a quote or an `=` is
/// quoted, so that the pairs can be told apart.
pub(crate) struct Fields<'a>(pub(crate) &'a [(String, String)]);

impl fmt::Display for Fields<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (key, value)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            let plain = !value.is_empty()
                && !value.chars().any(|c| c.is_whitespace() || c == '"' || c == '=');
            let key = Escaped(key);
            if plain { write!(f, "{key}={value}")? } else { write!(f, "{key}={value:?}")? }
        }
        Ok(())
    }
}

/// Guest text with control characters escaped (`\n`, `\u{1b}`, ...), so
/// that a guest cannot forge lines or terminal colours in the service's log.
pub(crate) struct Escaped<'a>(pub(crate) &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() { write!(f, "{}", c.escape_default())? } else { write!(f, "{c}")? }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_as_key_value_pairs_quoting_where_needed() {
        let fields = [
            ("user".to_owned(), "ada".to_owned()),
            ("note".to_owned(), "two words".to_owned()),
            ("empty".to_owned(), String::new()),
        ];
        assert_eq!(Fields(&fields).to_string(), r#"user=ada note="two words" empty="""#);
    }

    #[test]
    fn guest_text_cannot_forge_log_lines() {
        let forged = "ok\n2099-01-01 ERROR forged\u{1b}[31m";
        assert_eq!(Escaped(forged).to_string(), r"ok\n2099-01-01 ERROR forged\u{1b}[31m");
    }
}
