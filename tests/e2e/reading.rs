//! How a worker reads requests (it may poll for the next one before it
//! sleeps) and times calls (`cpu_us`), against a real daemon over raw
//! unix and TCP connections: frames dribbled in every way, split headers,
//! half-closes, large frames, many connections at once, idle workers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wasm_task::protocol::{self, CallStats, ErrorKind, PROTOCOL_VERSION, Request, Response};

use crate::harness::{Daemon, RawWorker, alive, guests, signal};

const BOUND: Duration = Duration::from_secs(60);

/// A raw connection over unix or TCP.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Conn {
    fn shutdown_write(&self) {
        match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Write).unwrap(),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Write).unwrap(),
        }
    }
}

/// Where to connect.
#[derive(Clone)]
enum Addr {
    Unix(std::path::PathBuf),
    Tcp(u16),
}

impl Addr {
    fn connect(&self) -> Conn {
        let c = match self {
            Addr::Unix(p) => Conn::Unix(UnixStream::connect(p).unwrap()),
            Addr::Tcp(port) => {
                let s = TcpStream::connect(("127.0.0.1", *port)).unwrap();
                s.set_nodelay(true).unwrap();
                Conn::Tcp(s)
            }
        };
        match &c {
            Conn::Unix(s) => s.set_read_timeout(Some(BOUND)).unwrap(),
            Conn::Tcp(s) => s.set_read_timeout(Some(BOUND)).unwrap(),
        }
        c
    }
}

/// A TCP daemon on a free loopback port, killed (by pid) on drop.
struct TcpDaemon {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TcpDaemon {
    fn start() -> TcpDaemon {
        let g = guests();
        for _ in 0..5 {
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let dir = tempfile::tempdir().unwrap();
            let log = dir.path().join("tcp.log");
            let mut child = Command::new(env!("CARGO_BIN_EXE_wasm-task"))
                .args(["serve", &format!("--listen=tcp:127.0.0.1:{port}")])
                .arg(format!("--module=testguest={}", g.testguest.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let started = Instant::now();
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return TcpDaemon { child, port, _dir: dir };
                }
                assert!(started.elapsed() < BOUND, "tcp daemon not ready");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("no tcp daemon");
    }
}

impl Drop for TcpDaemon {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

fn frame_of(request: &Request<'_>) -> Vec<u8> {
    let mut frame = Vec::new();
    protocol::encode_frame(request, &mut frame).unwrap();
    frame
}

/// Says hello; the worker's pid.
fn hello(conn: &mut Conn) -> u32 {
    let frame = frame_of(&Request::Hello {
        version: PROTOCOL_VERSION,
        module: "testguest",
        client: "reading",
    });
    conn.write_all(&frame).unwrap();
    match read_response(conn).expect("a hello") {
        Owned::Hello(pid) => pid,
        other => panic!("expected hello, got {other:?}"),
    }
}

#[derive(Debug)]
enum Owned {
    Hello(u32),
    Refused(ErrorKind, String),
    Reply { id: u64, result: Result<Vec<u8>, (ErrorKind, String)> },
    Other,
}

fn read_response(conn: &mut Conn) -> Option<Owned> {
    let mut body = Vec::new();
    match protocol::read_frame(conn, &mut body, usize::MAX) {
        Ok(true) => {}
        _ => return None,
    }
    Some(match protocol::decode::<Response>(&body).unwrap() {
        Response::Hello(h) => Owned::Hello(h.pid),
        Response::Refused(e) => Owned::Refused(e.kind, e.message),
        Response::Reply { id, result, .. } => Owned::Reply {
            id,
            result: result.map(|p| p.0.to_vec()).map_err(|e| (e.kind, e.message)),
        },
        _ => Owned::Other,
    })
}

fn call_frame(id: u64, method: &str, args: &[u8]) -> Vec<u8> {
    frame_of(&Request::Call { id, method, args, timeout_ms: None, unless_failed_since: None })
}

/// How bytes are dribbled.
#[derive(Clone, Copy, Debug)]
enum Gap {
    None,
    Yield,
    Spin(u64),
    Sleep(u64),
}

fn wait_gap(gap: Gap) {
    match gap {
        Gap::None => {}
        Gap::Yield => std::thread::yield_now(),
        Gap::Spin(us) => {
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(us) {
                std::hint::spin_loop();
            }
        }
        Gap::Sleep(us) => std::thread::sleep(Duration::from_micros(us)),
    }
}

/// Sends `frame` in pieces of `piece` bytes with `gap` between them.
fn dribble(conn: &mut Conn, frame: &[u8], piece: usize, gap: Gap) {
    for chunk in frame.chunks(piece) {
        conn.write_all(chunk).unwrap();
        wait_gap(gap);
    }
}

/// CPU time (utime + stime) of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the full line: 12 and 13 after "pid (comm) ".
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn echo_check(conn: &mut Conn, id: u64, value: &str, piece: usize, gap: Gap) {
    let args = rmp_serde::to_vec(value).unwrap();
    dribble(conn, &call_frame(id, "echo", &args), piece, gap);
    match read_response(conn) {
        Some(Owned::Reply { id: got, result: Ok(bytes), .. }) => {
            assert_eq!(got, id, "reply id ({gap:?}, piece {piece})");
            assert_eq!(bytes, args, "echo content ({gap:?}, piece {piece})");
        }
        other => panic!("call {id} ({gap:?}, piece {piece}): {other:?}"),
    }
}

fn dribble_all_patterns(addr: &Addr) {
    let mut conn = addr.connect();
    hello(&mut conn);
    let mut id = 0;
    // Enough calls per pattern to pass several probes (one every 64 reads).
    for (gap, calls) in [
        (Gap::None, 200),
        (Gap::Yield, 150),
        (Gap::Spin(5), 100),
        (Gap::Spin(20), 100),
        (Gap::Sleep(100), 60),
        (Gap::Sleep(1000), 4),
        (Gap::Spin(150), 60),
        (Gap::None, 100),
    ] {
        for i in 0..calls {
            id += 1;
            let value = format!("v{id}-{}", "x".repeat(i % 40));
            let piece = [1, 2, 3, 5, 4][i % 5];
            echo_check(&mut conn, id, &value, piece, gap);
        }
    }
}

#[test]
fn dribbled_frames_unix() {
    let daemon = Daemon::start(&[]);
    dribble_all_patterns(&Addr::Unix(daemon.socket.clone()));
    assert!(alive(daemon.pid()));
}

#[test]
fn dribbled_frames_tcp() {
    let daemon = TcpDaemon::start();
    dribble_all_patterns(&Addr::Tcp(daemon.port));
    assert!(alive(daemon.child.id()));
}

/// Header split across writes with pauses that span the poll window.
#[test]
fn split_headers_every_way() {
    let daemon = Daemon::start(&[]);
    let mut conn = Addr::Unix(daemon.socket.clone()).connect();
    hello(&mut conn);
    let mut id = 0;
    for round in 0..3 {
        for split in 1..4 {
            for gap_us in [0u64, 10, 30, 60, 120, 400] {
                id += 1;
                let args = rmp_serde::to_vec(&format!("r{round}s{split}g{gap_us}")).unwrap();
                let frame = call_frame(id, "echo", &args);
                conn.write_all(&frame[..split]).unwrap();
                wait_gap(Gap::Spin(gap_us));
                conn.write_all(&frame[split..4]).unwrap();
                wait_gap(Gap::Spin(gap_us));
                conn.write_all(&frame[4..]).unwrap();
                match read_response(&mut conn) {
                    Some(Owned::Reply { id: got, result: Ok(bytes), .. }) => {
                        assert_eq!((got, bytes), (id, args));
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }
}

fn wait_gone(pid: u32) {
    let started = Instant::now();
    while alive(pid) {
        assert!(started.elapsed() < BOUND, "worker {pid} did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A half-close in the middle of a frame (header or body) while the worker
/// polls: it answers with a protocol refusal and exits; the daemon serves on.
#[test]
fn half_close_mid_frame_is_refused_clearly() {
    let daemon = Daemon::start(&[]);
    let addr = Addr::Unix(daemon.socket.clone());
    for cut in [1usize, 3, 4, 7] {
        let mut conn = addr.connect();
        let pid = hello(&mut conn);
        // Warm into polling mode with quick round trips.
        for id in 1..=150 {
            echo_check(&mut conn, id, "warm", 64, Gap::None);
        }
        let args = rmp_serde::to_vec("cut short").unwrap();
        let frame = call_frame(999, "echo", &args);
        conn.write_all(&frame[..cut]).unwrap();
        conn.shutdown_write();
        match read_response(&mut conn) {
            Some(Owned::Refused(ErrorKind::Protocol, message)) => {
                assert!(message.contains("middle of a frame"), "cut {cut}: {message}");
            }
            other => panic!("cut {cut}: expected a protocol refusal, got {other:?}"),
        }
        assert!(read_response(&mut conn).is_none());
        wait_gone(pid);
    }
    // A full close mid-frame: the worker exits.
    let mut conn = addr.connect();
    let pid = hello(&mut conn);
    for id in 1..=100 {
        echo_check(&mut conn, id, "warm", 64, Gap::None);
    }
    let frame = call_frame(5000, "echo", &rmp_serde::to_vec("x".repeat(5000).as_str()).unwrap());
    conn.write_all(&frame[..2000]).unwrap();
    drop(conn);
    wait_gone(pid);
    assert!(alive(daemon.pid()));
    let mut conn = addr.connect();
    hello(&mut conn);
    echo_check(&mut conn, 1, "after", 1, Gap::None);
}

/// Requests pipelined: every reply arrives; a half-close then ends it.
/// (A half-close during a call ends the worker by design: the watchdog's
/// POLLRDHUP.)
#[test]
fn pipelined_then_half_close_gets_every_reply() {
    let daemon = Daemon::start(&[]);
    for addr in [Addr::Unix(daemon.socket.clone())] {
        let mut conn = addr.connect();
        hello(&mut conn);
        let mut all = Vec::new();
        for id in 1..=300u64 {
            all.extend(call_frame(id, "echo", &rmp_serde::to_vec(&id).unwrap()));
        }
        conn.write_all(&all).unwrap();
        for id in 1..=300u64 {
            match read_response(&mut conn) {
                Some(Owned::Reply { id: got, result: Ok(bytes), .. }) => {
                    assert_eq!(got, id);
                    assert_eq!(bytes, rmp_serde::to_vec(&id).unwrap());
                }
                other => panic!("reply {id}: {other:?}"),
            }
        }
        conn.shutdown_write();
        assert!(read_response(&mut conn).is_none(), "the end after the last reply");
    }
}

/// A very large frame in uneven chunks with pauses, and one over the limit.
#[test]
fn large_frames_in_uneven_chunks() {
    let daemon = Daemon::start(&["--max-frame=9000000"]);
    let mut conn = Addr::Unix(daemon.socket.clone()).connect();
    hello(&mut conn);
    for (id, size) in [(1u64, 70_000usize), (2, 4 << 20), (3, 65_536 - 20), (4, 8 << 20)] {
        let value: String = (0..size).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        let args = rmp_serde::to_vec(value.as_str()).unwrap();
        let frame = call_frame(id, "echo", &args);
        let mut at = 0;
        let mut k = 0usize;
        while at < frame.len() {
            k += 1;
            let piece = [1, 7, 4096, 65_536, 100_000, 3][k % 6].min(frame.len() - at);
            conn.write_all(&frame[at..at + piece]).unwrap();
            at += piece;
            if k.is_multiple_of(4) {
                wait_gap(Gap::Spin(80));
            }
        }
        match read_response(&mut conn) {
            Some(Owned::Reply { id: got, result: Ok(bytes), .. }) => {
                assert_eq!(got, id);
                assert!(bytes == args, "size {size}: echo differs");
            }
            other => panic!("size {size}: {:?}", other.map(|_| "not an ok reply")),
        }
    }
    // A header over the limit: refused with a clear message.
    conn.write_all(&(9_000_001u32).to_be_bytes()).unwrap();
    match read_response(&mut conn) {
        Some(Owned::Refused(ErrorKind::Protocol, message)) => {
            assert!(message.contains("9000001") || message.contains("9000000"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

/// Many connections at once, each dribbling: all replies right.
#[test]
fn many_dribbling_connections() {
    let daemon = Daemon::start(&[]);
    let addr = Addr::Unix(daemon.socket.clone());
    let threads: Vec<_> = (0..24)
        .map(|t| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut conn = addr.connect();
                hello(&mut conn);
                for id in 1..=140u64 {
                    let gap = match (id + t) % 4 {
                        0 => Gap::None,
                        1 => Gap::Yield,
                        2 => Gap::Spin(15),
                        _ => Gap::Sleep(50),
                    };
                    echo_check(&mut conn, id, &format!("t{t}c{id}"), 1 + (id as usize % 6), gap);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(alive(daemon.pid()));
}

/// After a busy phase that puts the worker in polling mode, an idle worker
/// uses (next to) no CPU.
#[test]
fn idle_worker_after_polling_uses_no_cpu() {
    let daemon = Daemon::start(&[]);
    for gap in [Gap::None, Gap::Spin(40), Gap::Sleep(100)] {
        let mut conn = Addr::Unix(daemon.socket.clone()).connect();
        let pid = hello(&mut conn);
        for id in 1..=300 {
            let args = rmp_serde::to_vec(&id).unwrap();
            conn.write_all(&call_frame(id, "echo", &args)).unwrap();
            let _ = read_response(&mut conn).unwrap();
            wait_gap(gap);
        }
        // Idle, mid-frame too (a header half sent).
        for partial in [false, true] {
            if partial {
                conn.write_all(&[0, 0]).unwrap();
            }
            let before = cpu_ticks(pid);
            std::thread::sleep(Duration::from_secs(2));
            let used = cpu_ticks(pid) - before;
            assert!(used <= 2, "{gap:?} partial {partial}: idle worker used {used} ticks in 2 s");
        }
    }
}

fn raw_stats(
    w: &mut RawWorker,
    method: &str,
    args: &impl serde::Serialize,
    t: Option<u64>,
) -> CallStats {
    let r = w.call(method, args, t).expect("a reply");
    let s = r.stats;
    assert!(s.cpu_us <= s.wall_us, "{method}: cpu {} > wall {}", s.cpu_us, s.wall_us);
    s
}

/// Sequences of short and long calls: cpu_us never over wall_us, sleeping
/// calls show little CPU after short calls, spinning ones a lot.
#[test]
fn cpu_us_across_call_sequences() {
    let daemon = Daemon::start(&[]);
    let mut w = RawWorker::connect(&daemon, "testguest");
    for round in 0..5 {
        for _ in 0..(20 * round + 1) {
            raw_stats(&mut w, "echo", &"s", None);
        }
        let slept = raw_stats(&mut w, "sleep_ms", &30u64, None);
        assert!(slept.wall_us >= 30_000, "{slept:?}");
        assert!(
            slept.cpu_us < 5_000,
            "round {round}: a 30 ms sleep after short calls used {slept:?}"
        );
        // A short call right after a long one.
        let short = raw_stats(&mut w, "echo", &"t", None);
        assert!(short.wall_us < 30_000, "{short:?}");
        let slept = raw_stats(&mut w, "sleep_ms", &1u64, None);
        assert!(slept.cpu_us < slept.wall_us, "1 ms sleep: {slept:?}");
    }
    // Spinning with a deadline: CPU close to wall.
    let r = w.call("spin", &(), Some(150)).expect("a timeout reply");
    assert_eq!(r.result.unwrap_err().kind, ErrorKind::Timeout);
    let s = r.stats;
    assert!(s.cpu_us <= s.wall_us, "{s:?}");
    assert!(s.cpu_us >= 10_000, "a call spinning for 150 ms shows next to no CPU: {s:?}");
}

/// Sleeps of many lengths around the 50 us threshold and beyond, interleaved.
#[test]
fn cpu_us_never_exceeds_wall_us_for_any_mix() {
    let daemon = Daemon::start(&[]);
    let mut w = RawWorker::connect(&daemon, "testguest");
    for i in 0..400u64 {
        let s = match i % 5 {
            0 | 1 => raw_stats(&mut w, "echo", &i, None),
            2 => raw_stats(&mut w, "sleep_ms", &0u64, None),
            3 => raw_stats(&mut w, "add", &serde_json_like(i), None),
            _ => raw_stats(&mut w, "sleep_ms", &(i % 3), None),
        };
        let _ = s;
    }
}

#[derive(serde::Serialize)]
struct AddArgs {
    a: i64,
    b: i64,
    label: &'static str,
}

fn serde_json_like(i: u64) -> AddArgs {
    AddArgs { a: i as i64, b: 1, label: "x" }
}

/// Hostile guest spin: still interrupted on deadline after a polling phase.
#[test]
fn spin_after_polling_phase_still_times_out() {
    let mut daemon = Daemon::start(&["--hung-timeout=2s"]);
    let mut w = RawWorker::connect(&daemon, "testguest");
    for i in 0..200u64 {
        raw_stats(&mut w, "echo", &i, None);
    }
    let r = w.call("spin", &(), Some(100)).expect("reply");
    assert_eq!(r.result.unwrap_err().kind, ErrorKind::Timeout);
    assert!(daemon.stop().success());
}
