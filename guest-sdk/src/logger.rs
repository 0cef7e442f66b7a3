//! A `log` backend that hands every record to the daemon, with its
//! key-value fields.

use log::kv::{self, Key, Value, VisitSource};
use log::{LevelFilter, Log, Metadata, Record};

use crate::host;

/// Forwards records to the daemon's `log` and `log_fields` imports.
///
/// It keeps every level: the daemon and the client decide what to show.
struct HostLogger;

impl Log for HostLogger {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &Record<'_>) {
        // A message without arguments needs no formatting, so no allocation.
        let formatted;
        let message = match record.args().as_str() {
            Some(text) => text,
            None => {
                formatted = record.args().to_string();
                &formatted
            }
        };
        let fields = encode_fields(record.key_values());
        if fields.is_empty() {
            host::log(record.level(), record.target(), message);
        } else {
            host::log_fields(record.level(), record.target(), message, &fields);
        }
    }

    fn flush(&self) {}
}

/// Encodes a record's key-value fields as the `log_fields` import reads
/// them (see `docs/abi.md`): for each field, the key's length as a
/// little-endian `u32`, the key, the value's length, the value as text.
fn encode_fields(source: &dyn kv::Source) -> Vec<u8> {
    let mut encoder = FieldEncoder(Vec::new());
    // The encoder never fails; a source that does keeps what it gave.
    let _ = source.visit(&mut encoder);
    encoder.0
}

struct FieldEncoder(Vec<u8>);

impl FieldEncoder {
    fn put(&mut self, text: &str) {
        let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(&text.as_bytes()[..len as usize]);
    }
}

impl<'kvs> VisitSource<'kvs> for FieldEncoder {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
        self.put(key.as_str());
        match value.to_borrowed_str() {
            Some(text) => self.put(text),
            None => self.put(&value.to_string()),
        }
        Ok(())
    }
}

/// Makes [`HostLogger`] the `log` backend, unless the guest installed its own.
pub(crate) fn install() {
    static LOGGER: HostLogger = HostLogger;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Trace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_length_prefixed_keys_and_values_in_order() {
        let fields: [(&str, &dyn kv::ToValue); 2] = [("user", &"ada"), ("tries", &3)];
        let encoded = encode_fields(&fields);
        let mut expected = Vec::new();
        for text in ["user", "ada", "tries", "3"] {
            expected.extend_from_slice(&(text.len() as u32).to_le_bytes());
            expected.extend_from_slice(text.as_bytes());
        }
        assert_eq!(encoded, expected);
        let none: [(&str, i32); 0] = [];
        assert!(encode_fields(&none).is_empty());
    }
}
