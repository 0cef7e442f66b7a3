//! Replies and requests of every size through the worker: results left out
//! of the reply's buffer and written from guest memory, frames straddling
//! the worker's read buffer, the frame limit, slow readers, and arguments
//! a guest borrows from the request.

use std::io::{Read, Write};

use wasm_task::protocol::{self, ErrorKind, LEAVE_OUT_MIN, Request, Response};

use crate::harness::{Daemon, RawWorker, wat_guest};

/// A daemon serving, besides the usual guests, `pattern`, whose `bin n`
/// answers a bin of `n` patterned bytes.
fn daemon(extra: &[&str]) -> Daemon {
    let pattern = format!("--module=pattern={}", wat_guest("pattern").display());
    Daemon::start(&[&[pattern.as_str()], extra].concat())
}

/// What `pattern`'s `bin n` answers: a MessagePack bin32 of `n` bytes.
fn pattern(n: usize) -> Vec<u8> {
    let mut v = vec![0xc6];
    v.extend_from_slice(&(n as u32).to_be_bytes());
    v.extend((0..n).map(|i| (i.wrapping_mul(31).wrapping_add(n)) as u8));
    v
}

/// The frame of call `id`, with `args` as given.
fn call_frame(id: u64, method: &str, args: &[u8]) -> Vec<u8> {
    let call = Request::Call { id, method, args, timeout_ms: None, unless_failed_since: None };
    let mut frame = Vec::new();
    protocol::encode_frame(&call, &mut frame).unwrap();
    frame
}

/// Reads the reply to call `id` and checks its result is `want`.
fn expect(worker: &mut RawWorker, id: u64, want: &[u8], what: &str) {
    let reply = worker.receive().unwrap_or_else(|| panic!("{what}: connection closed"));
    assert_eq!(reply.id, id, "{what}");
    let got = reply.result.unwrap_or_else(|e| panic!("{what}: {e:?}"));
    assert!(got == want, "{what}: {} bytes back, {} wanted, or they differ", got.len(), want.len());
}

#[test]
fn results_of_every_size_around_the_left_out_threshold_arrive_whole() {
    let daemon = daemon(&[]);
    // Results that point into the request (echo) ...
    let mut echo = RawWorker::connect(&daemon, "echo");
    let mut id = 0;
    let sizes = (0..20).chain(LEAVE_OUT_MIN - 20..LEAVE_OUT_MIN + 20).chain([65_535, 1 << 20]);
    for len in sizes {
        id += 1;
        let args: Vec<u8> = (0..len).map(|i| (i * 13 + len) as u8).collect();
        echo.stream().write_all(&call_frame(id, "echo", &args)).unwrap();
        expect(&mut echo, id, &args, &format!("echo of {len} bytes"));
    }
    // ... and results made in guest memory, sent ahead of their replies.
    let mut bin = RawWorker::connect(&daemon, "pattern");
    let sizes: Vec<usize> = (LEAVE_OUT_MIN - 10..LEAVE_OUT_MIN + 10).chain([3 << 20]).collect();
    let mut sent = Vec::new();
    for &n in &sizes {
        sent.push(bin.send("bin", &(n as u32), None, None).unwrap());
    }
    for (&n, id) in sizes.iter().zip(sent) {
        expect(&mut bin, id, &pattern(n), &format!("bin {n}"));
    }
}

#[test]
fn a_reply_over_the_frame_limit_is_a_limit_error_never_a_longer_frame() {
    let max = 200_000usize;
    let daemon = daemon(&[&format!("--max-frame={max}")]);
    let mut first_refused = None;
    // The reply's envelope around the result is a few dozen bytes.
    for n in (max - 100..max + 10).step_by(5) {
        let mut worker = RawWorker::connect(&daemon, "pattern");
        let id = worker.send("bin", &(n as u32), None, None).unwrap();
        let mut body = Vec::new();
        assert!(
            protocol::read_frame(worker.stream(), &mut body, usize::MAX).unwrap(),
            "bin {n}: the connection closed without a reply"
        );
        assert!(body.len() <= max, "bin {n}: a frame of {} bytes, above {max}", body.len());
        match protocol::decode::<Response>(&body).unwrap() {
            Response::Reply { id: got, result: Ok(result), .. } => {
                assert_eq!(got, id);
                assert!(result.0 == pattern(n), "bin {n}");
                assert!(
                    first_refused.is_none(),
                    "bin {n} answered after a smaller one was refused"
                );
            }
            Response::Reply { result: Err(e), .. } => {
                assert_eq!(e.kind, ErrorKind::Limit, "bin {n}: {e:?}");
                assert!(e.message.contains("frame limit"), "{}", e.message);
                first_refused.get_or_insert(n);
            }
            other => panic!("bin {n}: {other:?}"),
        }
    }
    assert!(first_refused.is_some_and(|n| n > max - 100), "{first_refused:?}");
}

#[test]
fn a_frame_limit_beyond_what_a_length_prefix_holds_is_refused_at_start() {
    let echo = format!("--module=echo={}", wat_guest("echo").display());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wasm-task"))
        .args(["serve", "--listen=unix:/nonexistent/never.sock", &echo, "--max-frame=4294967296"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("'4294967296' for '--max-frame"), "{stderr}");
}

#[test]
fn a_client_reading_a_large_reply_slowly_gets_all_of_it() {
    let daemon = daemon(&[]);
    let mut worker = RawWorker::connect(&daemon, "pattern");
    let n = 4 << 20;
    for round in 0..2 {
        let id = worker.send("bin", &(n as u32), None, None).unwrap();
        // Odd-sized pieces: the worker's vectored writes are cut anywhere.
        let (mut frame, mut buf, mut k) = (Vec::new(), [0u8; 4099], 0);
        let mut total = None;
        while Some(frame.len()) != total {
            let want = [1, 7, 4099, 13, 4096, 3][k % 6];
            k += 1;
            let got = worker.stream().read(&mut buf[..want]).unwrap();
            assert!(got > 0, "round {round}: closed after {} bytes", frame.len());
            frame.extend_from_slice(&buf[..got]);
            if total.is_none() && frame.len() >= 4 {
                total = Some(u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize + 4);
            }
        }
        match protocol::decode::<Response>(&frame[4..]).unwrap() {
            Response::Reply { id: got, result: Ok(result), .. } => {
                assert_eq!(got, id);
                assert!(result.0 == pattern(n), "round {round}");
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
}

#[test]
fn frames_straddling_the_workers_read_buffer_are_read_whole() {
    let daemon = daemon(&[]);
    let mut worker = RawWorker::connect(&daemon, "echo");
    let mut id = 0;
    // Three frames in one write, the first ending around the 4 KiB buffer.
    for first in 4060..4110 {
        let a = vec![0xaa; first];
        let b: Vec<u8> = (0..5000).map(|i| i as u8).collect();
        let mut bytes = call_frame(id + 1, "echo", &a);
        bytes.extend(call_frame(id + 2, "echo", &b));
        bytes.extend(call_frame(id + 3, "echo", b"\x01"));
        worker.stream().write_all(&bytes).unwrap();
        expect(&mut worker, id + 1, &a, "first");
        expect(&mut worker, id + 2, &b, "second");
        expect(&mut worker, id + 3, b"\x01", "third");
        id += 3;
    }
    // One frame in two writes, cut around the buffer's size.
    for cut in [4090, 4095, 4096, 4097, 4100, 8192, 8193] {
        id += 1;
        let args: Vec<u8> = (0..20_000).map(|i| (i * 3) as u8).collect();
        let frame = call_frame(id, "echo", &args);
        worker.stream().write_all(&frame[..cut]).unwrap();
        worker.stream().flush().unwrap();
        worker.stream().write_all(&frame[cut..]).unwrap();
        expect(&mut worker, id, &args, &format!("cut at {cut}"));
    }
}

/// The arguments of `swap_borrowed`, which borrows both from the request.
#[derive(serde::Serialize)]
struct Borrowed<'a> {
    name: &'a str,
    #[serde(with = "serde_bytes")]
    bytes: &'a [u8],
}

/// Methods may take arguments borrowed from the request, and results of
/// any size travel back from guest memory (the large ones without a copy
/// in the worker).
#[tokio::test]
async fn borrowed_arguments_and_large_results_round_trip() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").build();
    let worker = client.checkout().await.unwrap();
    for len in [0usize, 1, 4095, 4096, 70_000, 3 << 20] {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let name = format!("{len} bytes");
        let args = Borrowed { name: &name, bytes: &bytes };
        let (back, back_name): (serde_bytes::ByteBuf, String) =
            worker.call("swap_borrowed", &args).await.unwrap();
        assert!(back.as_slice() == bytes.as_slice(), "{len} bytes came back changed");
        assert_eq!(back_name, name);
    }
}

#[test]
fn arguments_a_guest_cannot_borrow_are_a_clear_error() {
    let daemon = Daemon::start(&[]);
    let mut worker = RawWorker::connect(&daemon, "testguest");
    // {"name": a str of the bytes ff fe (not UTF-8), "bytes": bin [7]}
    let not_utf8 = [
        0x82, 0xa4, b'n', b'a', b'm', b'e', 0xa2, 0xff, 0xfe, 0xa5, b'b', b'y', b't', b'e', b's',
        0xc4, 0x01, 0x07,
    ];
    #[derive(serde::Serialize)]
    struct Array<'a> {
        name: &'a str,
        bytes: Vec<u8>,
    }
    let array = rmp_serde::to_vec_named(&Array { name: "x", bytes: vec![1, 2] }).unwrap();
    let mut id = 0;
    for (what, args) in [("a name not UTF-8", &not_utf8[..]), ("bytes as an array", &array)] {
        id += 1;
        worker.stream().write_all(&call_frame(id, "swap_borrowed", args)).unwrap();
        let reply = worker.receive().unwrap_or_else(|| panic!("{what}: connection closed"));
        let error = reply.result.expect_err(what);
        assert_eq!(error.kind, ErrorKind::GuestError, "{what}: {error:?}");
        assert!(
            error.message.contains("decoding arguments of method `swap_borrowed`"),
            "{what}: {}",
            error.message
        );
    }
    // The worker serves on.
    id += 1;
    let args = rmp_serde::to_vec_named(&Borrowed { name: "n", bytes: b"b" }).unwrap();
    worker.stream().write_all(&call_frame(id, "swap_borrowed", &args)).unwrap();
    let want = rmp_serde::to_vec_named(&(serde_bytes::Bytes::new(b"b"), "n")).unwrap();
    expect(&mut worker, id, &want, "well-formed arguments");
}
