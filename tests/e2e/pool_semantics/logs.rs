//! Guest log records with key-value fields and output lines: relayed with
//! the reply, success or error, re-emitted as tracing events, and readable
//! with the result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use wasm_task::Error;
use wasm_task::protocol::LogRecord;

use crate::harness::Daemon;

/// The fields of an event, as text.
type Fields = HashMap<String, String>;

/// Collects the events emitted while it is the default subscriber.
#[derive(Clone, Default)]
struct Capture {
    events: Arc<Mutex<Vec<Fields>>>,
}

struct Visitor<'a>(&'a mut Fields);

impl tracing::field::Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields::new();
        event.record(&mut Visitor(&mut fields));
        self.events.lock().unwrap().push(fields);
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

impl Capture {
    /// The event whose message is `message`.
    fn event(&self, message: &str) -> Fields {
        let events = self.events.lock().unwrap();
        let found = events.iter().find(|e| e.get("message").is_some_and(|m| m == message));
        found.cloned().unwrap_or_else(|| panic!("no event {message:?} in {events:#?}"))
    }
}

#[derive(Serialize)]
struct Login<'a> {
    user: &'a str,
    tries: u32,
}

fn record<'a>(logs: &'a [LogRecord], message: &str) -> &'a LogRecord {
    let found = logs.iter().find(|r| r.message == message);
    found.unwrap_or_else(|| panic!("no record {message:?} in {logs:#?}"))
}

fn pairs(fields: &[(&str, &str)]) -> Vec<(String, String)> {
    fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[tokio::test]
async fn guest_records_with_fields_and_output_lines_reach_tracing_and_the_report() {
    let capture = Capture::default();
    let _default = tracing::subscriber::set_default(capture.clone());
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").build();
    let worker = client.checkout().await.unwrap();
    let pid = worker.worker_pid().to_string();

    let report = worker.call_report::<()>("log_fields", &Login { user: "ada", tries: 3 }).await;
    report.result.unwrap();
    let login = record(&report.logs, "login by ada");
    assert_eq!((login.level, login.target.as_str()), (3, "testguest"));
    assert_eq!(login.fields, pairs(&[("user", "ada"), ("tries", "3")]));
    assert_eq!(record(&report.logs, "out: ada").target, "stdout");
    assert_eq!(record(&report.logs, "err: 3").target, "stderr");
    assert!(report.timings.worker.is_some(), "{:?}", report.timings);

    let event = capture.event("login by ada");
    for (name, value) in [
        ("worker.pid", pid.as_str()),
        ("module", "testguest"),
        ("method", "log_fields"),
        ("target", "testguest"),
        ("fields", "user=ada tries=3"),
        ("at_us", &login.at_us.to_string()),
    ] {
        assert_eq!(event.get(name).map(String::as_str), Some(value), "{name} in {event:?}");
    }
    assert_eq!(capture.event("out: ada").get("target").map(String::as_str), Some("stdout"));
}

#[tokio::test]
async fn records_made_before_an_error_travel_with_it() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").build();
    let worker = client.checkout().await.unwrap();

    let report = worker.call_report::<()>("log_then_fail", &"disk full").await;
    assert!(
        matches!(&report.result, Err(Error::GuestError { message, .. }) if message == "disk full")
    );
    let warning = record(&report.logs, "about to fail");
    assert_eq!(warning.level, 2);
    assert_eq!(warning.fields, pairs(&[("reason", "disk full")]));
}
