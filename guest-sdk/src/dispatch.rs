//! Finding a method, decoding its arguments and encoding its outcome.

use std::fmt::Display;
use std::io::Write as _;

use serde::Deserialize;
use serde::Serialize;

use crate::reply::Status;

/// Runs a method on its encoded arguments, writing the reply into `out`.
type Runner = fn(&[u8], &mut Vec<u8>) -> Status;

/// One entry of the method table that [`export!`](crate::export) builds.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct Method {
    name: &'static str,
    run: Runner,
}

impl Method {
    /// A method called `name`, run by `run`.
    pub const fn new(name: &'static str, run: Runner) -> Method {
        Method { name, run }
    }
}

/// Panics if a name is empty, holds a newline or is taken twice.
///
/// [`export!`](crate::export) evaluates it at compile time, so a bad table
/// is a build error rather than a method that can never be called or a
/// broken method list (whose separator is the newline).
#[doc(hidden)]
pub const fn check_names(methods: &[Method]) {
    let mut i = 0;
    while i < methods.len() {
        check_name(methods[i].name);
        let mut earlier = 0;
        while earlier < i {
            assert!(
                !same(methods[earlier].name, methods[i].name),
                "two methods have the same name"
            );
            earlier += 1;
        }
        i += 1;
    }
}

/// Panics if `name` is empty or holds a newline.
const fn check_name(name: &str) {
    assert!(!name.is_empty(), "a method name is empty");
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        assert!(bytes[i] != b'\n', "a method name contains a newline");
        i += 1;
    }
}

/// String equality usable in const fns.
const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Decodes `args`, calls `method` and encodes its outcome into `out`.
///
/// `name` is the method's name, for error messages.
#[doc(hidden)]
pub fn run_method<'a, A, R, E>(
    name: &str,
    method: impl FnOnce(A) -> Result<R, E>,
    args: &'a [u8],
    out: &mut Vec<u8>,
) -> Status
where
    A: Deserialize<'a>,
    R: Serialize,
    E: Display,
{
    let args = match rmp_serde::from_slice(args) {
        Ok(args) => args,
        Err(e) => {
            return message(
                out,
                Status::Error,
                format_args!("decoding arguments of method `{name}`: {e}"),
            );
        }
    };

    match method(args) {
        Ok(result) => encode(name, &result, out),
        Err(e) => message(out, Status::Error, e),
    }
}

/// Encodes a method's result, structs as maps.
fn encode(name: &str, result: &impl Serialize, out: &mut Vec<u8>) -> Status {
    match rmp_serde::encode::write_named(out, result) {
        Ok(()) => Status::Ok,
        Err(e) => {
            // The failed encoder may have written part of a value.
            out.clear();
            message(out, Status::Error, format_args!("encoding result of method `{name}`: {e}"))
        }
    }
}

/// Finds the method called `method` in `methods` and runs it on `args`.
pub(crate) fn dispatch(
    methods: &[Method],
    method: &[u8],
    args: &[u8],
    out: &mut Vec<u8>,
) -> Status {
    match methods.iter().find(|m| m.name.as_bytes() == method) {
        Some(m) => (m.run)(args, out),
        None => unknown(methods, out),
    }
}

/// The reply to a call of a method the guest lacks: the methods it has.
///
/// The daemon's error already names the method that was asked for.
fn unknown(methods: &[Method], out: &mut Vec<u8>) -> Status {
    if methods.is_empty() {
        return message(out, Status::UnknownMethod, "this module has no methods");
    }
    out.extend_from_slice(b"this module has ");
    write_names(methods, ", ", out);
    Status::UnknownMethod
}

/// Writes the names of `methods` into `out`, separated by newlines.
pub(crate) fn list(methods: &[Method], out: &mut Vec<u8>) -> Status {
    write_names(methods, "\n", out);
    Status::Ok
}

/// Writes the names of `methods` into `out`, separated by `separator`.
fn write_names(methods: &[Method], separator: &str, out: &mut Vec<u8>) {
    for (i, method) in methods.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(separator.as_bytes());
        }
        out.extend_from_slice(method.name.as_bytes());
    }
}

/// Runs a setup or checkout-done hook; the reply is empty or the error's text.
pub(crate) fn run_hook<E: Display>(
    hook: impl FnOnce() -> Result<(), E>,
    out: &mut Vec<u8>,
) -> Status {
    match hook() {
        Ok(()) => Status::Ok,
        Err(e) => message(out, Status::Error, e),
    }
}

/// Writes `text` into `out` as the reply's message and returns `status`.
fn message(out: &mut Vec<u8>, status: Status, text: impl Display) -> Status {
    // Writing to a `Vec` only fails if `text`'s `Display` does, and then the
    // part it wrote is the best message there is.
    let _ = write!(out, "{text}");
    status
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    struct Add {
        a: i64,
        b: i64,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sum {
        sum: i64,
    }

    fn add(args: Add) -> Result<Sum, String> {
        let sum = args.a.checked_add(args.b).ok_or("sum overflows")?;
        Ok(Sum { sum })
    }

    fn shout(text: String) -> Result<String, std::convert::Infallible> {
        Ok(text.to_uppercase())
    }

    const METHODS: &[Method] = &[
        Method::new("add", |args, out| run_method("add", add, args, out)),
        Method::new("shout", |args, out| run_method("shout", shout, args, out)),
    ];

    fn call(method: &str, args: &impl Serialize) -> (Status, Vec<u8>) {
        let args = rmp_serde::to_vec_named(args).unwrap();
        let mut out = Vec::new();
        let status = dispatch(METHODS, method.as_bytes(), &args, &mut out);
        (status, out)
    }

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn method_result_is_encoded_with_structs_as_maps() {
        let (status, out) = call("add", &Add { a: 2, b: 40 });
        assert_eq!(status, Status::Ok);
        assert_eq!(out, rmp_serde::to_vec_named(&Sum { sum: 42 }).unwrap());
        assert_eq!(out[0], 0x81, "a fixmap of one entry");
    }

    #[test]
    fn arguments_may_also_come_as_an_array() {
        let (status, out) = call("add", &(1, 2));
        assert_eq!(status, Status::Ok);
        assert_eq!(rmp_serde::from_slice::<Sum>(&out).unwrap(), Sum { sum: 3 });
    }

    #[test]
    fn second_method_is_found_too() {
        let (status, out) = call("shout", &"hey");
        assert_eq!(status, Status::Ok);
        assert_eq!(rmp_serde::from_slice::<String>(&out).unwrap(), "HEY");
    }

    #[test]
    fn method_error_is_an_error_reply_with_its_text() {
        let (status, out) = call("add", &(i64::MAX, 1));
        assert_eq!((status, text(out)), (Status::Error, "sum overflows".to_owned()));
    }

    #[test]
    fn undecodable_arguments_name_the_method() {
        let (status, out) = call("shout", &17);
        assert_eq!(status, Status::Error);
        let message = text(out);
        assert!(message.starts_with("decoding arguments of method `shout`: "), "{message}");
    }

    #[test]
    fn truncated_arguments_are_an_error_not_a_crash() {
        let mut out = Vec::new();
        let status = dispatch(METHODS, b"shout", &[0xa5, b'a'], &mut out);
        assert_eq!(status, Status::Error);
        assert!(text(out).starts_with("decoding arguments of method `shout`"));
    }

    #[test]
    fn unknown_method_has_its_own_status_and_lists_the_known_ones() {
        let (status, out) = call("subtract", &(1, 2));
        assert_eq!(
            (status, text(out)),
            (Status::UnknownMethod, "this module has add, shout".to_owned())
        );
        let mut out = Vec::new();
        assert_eq!(dispatch(&[], b"add", &[0xc0], &mut out), Status::UnknownMethod);
        assert_eq!(text(out), "this module has no methods");
    }

    #[test]
    fn method_names_are_matched_exactly() {
        assert_eq!(call("Add", &(1, 2)).0, Status::UnknownMethod);
        assert_eq!(call("add ", &(1, 2)).0, Status::UnknownMethod);
    }

    #[test]
    fn non_utf8_method_name_is_unknown_not_a_crash() {
        let mut out = Vec::new();
        assert_eq!(dispatch(METHODS, &[0xff, b'x'], &[0xc0], &mut out), Status::UnknownMethod);
    }

    #[test]
    fn unencodable_result_is_an_error_reply() {
        struct Broken;
        impl Serialize for Broken {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("broken on purpose"))
            }
        }
        let mut out = Vec::new();
        let status = run_method("broken", |()| Ok::<_, String>(Broken), &[0xc0], &mut out);
        assert_eq!(status, Status::Error);
        assert_eq!(text(out), "encoding result of method `broken`: broken on purpose");
    }

    #[test]
    fn method_list_is_newline_separated() {
        let mut out = Vec::new();
        assert_eq!(list(METHODS, &mut out), Status::Ok);
        assert_eq!(text(out), "add\nshout");
        let mut out = Vec::new();
        list(&[], &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn distinct_names_pass_the_check() {
        check_names(METHODS);
        check_names(&[]);
    }

    #[test]
    #[should_panic(expected = "two methods have the same name")]
    fn duplicate_names_fail_the_check() {
        check_names(&[METHODS[0], METHODS[1], METHODS[0]]);
    }

    #[test]
    #[should_panic(expected = "a method name contains a newline")]
    fn newline_in_a_name_fails_the_check() {
        check_names(&[Method::new("two\nlines", METHODS[0].run)]);
    }

    #[test]
    #[should_panic(expected = "a method name is empty")]
    fn empty_name_fails_the_check() {
        check_names(&[Method::new("", METHODS[0].run)]);
    }

    #[test]
    fn hook_error_is_reported_as_text() {
        let mut out = Vec::new();
        assert_eq!(run_hook(|| Ok::<(), String>(()), &mut out), Status::Ok);
        assert!(out.is_empty());
        let status = run_hook(|| Err("no config in /data"), &mut out);
        assert_eq!((status, text(out)), (Status::Error, "no config in /data".to_owned()));
    }
}
