//! A fake wasm-task daemon for the client tests: it speaks the wire protocol
//! from inside the test's own runtime, with methods that misbehave on demand.
//!
//! Methods: `echo` (returns its arguments), `pid`, `slow` (answers after an
//! hour unless the client goes away; requests sent meanwhile are kept for
//! later), `fail` (guest error), `trap` (guest trap,
//! then closes), `worker_timeout` (a timeout reply, then closes), `hang_up`
//! (closes without answering), `truncate` (half a frame, then closes), `huge`
//! (announces a 1 MiB frame), `garbage` (a frame that is not MessagePack),
//! `wrong_id`, `log` (answers with two log records). Anything else is an
//! unknown method. Module `missing` is refused as unknown, `bad_setup` as a
//! failed setup.

#![allow(dead_code)] // each test file uses a different part

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use wasm_task::protocol::{
    CallStats, ErrorKind, ErrorReply, HelloReply, LogRecord, PROTOCOL_VERSION, Payload, Request,
    Response,
};
use wasm_task::{Address, Client, ClientBuilder};

/// How the fake daemon behaves.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Workers say they have a checkout-done hook.
    pub hook: bool,
    /// The hook reports an error.
    pub hook_fails: bool,
    /// This many hellos are refused with `unknown_module` before any is accepted.
    pub refuse_first: usize,
    /// How long a worker keeps its end open after its client hung up, like
    /// a process slow to exit.
    pub linger: Option<Duration>,
}

/// What the daemon saw, shared with its connection tasks.
#[derive(Default)]
pub struct Seen {
    options: Options,
    next_pid: AtomicU32,
    hellos: AtomicUsize,
    open: AtomicUsize,
    events: Mutex<Vec<(u32, String)>>,
    echoed: Mutex<Vec<Vec<u8>>>,
    kill: Mutex<Option<watch::Sender<u64>>>,
}

impl Seen {
    fn log(&self, pid: u32, what: impl Into<String>) {
        self.events.lock().unwrap().push((pid, what.into()));
    }
}

/// A fake daemon on a unix socket in a temporary directory, or on 127.0.0.1.
pub struct FakeDaemon {
    _dir: tempfile::TempDir,
    address: Address,
    seen: Arc<Seen>,
    accept: Option<JoinHandle<()>>,
}

impl FakeDaemon {
    /// A daemon that is not listening yet: its socket does not exist.
    pub fn stopped(options: Options) -> FakeDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let address = Address::Unix(dir.path().join("daemon.sock"));
        let (kill, _) = watch::channel(0);
        let seen = Seen {
            options,
            next_pid: AtomicU32::new(1000),
            kill: Mutex::new(Some(kill)),
            ..Seen::default()
        };
        FakeDaemon { _dir: dir, address, seen: Arc::new(seen), accept: None }
    }

    /// A daemon listening on its unix socket.
    pub fn running(options: Options) -> FakeDaemon {
        let mut daemon = FakeDaemon::stopped(options);
        daemon.start();
        daemon
    }

    /// A daemon listening on an ephemeral TCP port of 127.0.0.1.
    pub async fn running_tcp(options: Options) -> FakeDaemon {
        let mut daemon = FakeDaemon::stopped(options);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
        let port = listener.local_addr().unwrap().port();
        daemon.address = Address::Tcp { host: "127.0.0.1".into(), port };
        let seen = daemon.seen.clone();
        daemon.accept = Some(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, seen.clone()));
            }
        }));
        daemon
    }

    /// Starts listening on the unix socket.
    pub fn start(&mut self) {
        let Address::Unix(path) = &self.address else { panic!("not a unix daemon") };
        let listener = UnixListener::bind(path).expect("bind the fake daemon's socket");
        let seen = self.seen.clone();
        self.accept = Some(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, seen.clone()));
            }
        }));
    }

    pub fn address(&self) -> Address {
        self.address.clone()
    }

    pub fn path(&self) -> PathBuf {
        match &self.address {
            Address::Unix(path) => path.clone(),
            Address::Tcp { .. } => panic!("not a unix daemon"),
        }
    }

    /// A client builder for module `echo` at this daemon.
    pub fn client(&self) -> ClientBuilder {
        self.client_of("echo")
    }

    pub fn client_of(&self, module: &str) -> ClientBuilder {
        Client::builder(self.address(), module).client_name("client-tests")
    }

    /// Hellos received, refused ones included.
    pub fn hellos(&self) -> usize {
        self.seen.hellos.load(Ordering::SeqCst)
    }

    /// Connections currently open on the daemon's side.
    pub fn open(&self) -> usize {
        self.seen.open.load(Ordering::SeqCst)
    }

    /// Everything worker `pid` saw, in order: `call METHOD`, `checkout_done`, `closed`.
    pub fn events_of(&self, pid: u32) -> Vec<String> {
        let events = self.seen.events.lock().unwrap();
        events.iter().filter(|(p, _)| *p == pid).map(|(_, what)| what.clone()).collect()
    }

    /// The arguments of every `echo` call, in the order they arrived.
    pub fn echoed(&self) -> Vec<Vec<u8>> {
        self.seen.echoed.lock().unwrap().clone()
    }

    /// Whether worker `pid`'s connection has closed.
    pub fn closed(&self, pid: u32) -> bool {
        self.events_of(pid).iter().any(|what| what == "closed")
    }

    /// Closes every connection that is waiting for a request.
    pub fn kill_idle_workers(&self) {
        if let Some(kill) = self.seen.kill.lock().unwrap().as_ref() {
            kill.send_modify(|generation| *generation += 1);
        }
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }
}

/// Counts a connection as open while it lives.
struct OpenGuard(Arc<Seen>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

type Conn<S> = Framed<S, LengthDelimitedCodec>;

async fn send<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut Conn<S>, response: &Response<'_>) {
    let body = rmp_serde::to_vec_named(response).expect("encode a response");
    // The client may be gone already; the read that follows notices.
    let _ = conn.send(Bytes::from(body)).await;
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(stream: S, seen: Arc<Seen>) {
    seen.open.fetch_add(1, Ordering::SeqCst);
    let _open = OpenGuard(seen.clone());
    let mut kill = seen.kill.lock().unwrap().as_ref().expect("kill channel").subscribe();
    let pid = seen.next_pid.fetch_add(1, Ordering::SeqCst);
    let mut conn = Framed::new(stream, LengthDelimitedCodec::new());

    if hello(&mut conn, &seen, pid).await {
        let mut state = ConnState::default();
        loop {
            let frame = match state.later.pop_front() {
                Some(frame) => frame,
                None => {
                    let frame = tokio::select! {
                        frame = conn.next() => frame,
                        _ = kill.changed() => break,
                    };
                    let Some(Ok(frame)) = frame else { break };
                    frame
                }
            };
            let request: Request = rmp_serde::from_slice(&frame).expect("a valid request");
            if !answer(&mut conn, &seen, pid, request, &mut state).await {
                break;
            }
        }
    }
    if let Some(linger) = seen.options.linger {
        tokio::time::sleep(linger).await;
    }
    seen.log(pid, "closed");
}

/// Answers the hello; false if the connection is refused or gone.
async fn hello<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    seen: &Seen,
    pid: u32,
) -> bool {
    let Some(Ok(frame)) = conn.next().await else { return false };
    let Ok(Request::Hello { version, module, .. }) = rmp_serde::from_slice(&frame) else {
        panic!("the first request must be a hello");
    };
    assert_eq!(version, PROTOCOL_VERSION);
    let refused_before = seen.hellos.fetch_add(1, Ordering::SeqCst);

    let refusal = match module {
        "missing" => Some(ErrorKind::UnknownModule),
        "bad_setup" => Some(ErrorKind::SetupFailed),
        _ if refused_before < seen.options.refuse_first => Some(ErrorKind::UnknownModule),
        _ => None,
    };
    if let Some(kind) = refusal {
        let message = format!("refusing module {module}");
        send(conn, &Response::Refused(ErrorReply { kind, message, backtrace: None })).await;
        return false;
    }
    let hello = HelloReply {
        version: PROTOCOL_VERSION,
        pid,
        module: module.to_owned(),
        methods: vec!["echo".into(), "pid".into(), "slow".into()],
        checkout_done_hook: seen.options.hook,
    };
    send(conn, &Response::Hello(hello)).await;
    true
}

fn error(kind: ErrorKind, message: &str) -> ErrorReply {
    ErrorReply { kind, message: message.into(), backtrace: None }
}

/// What a connection remembers between requests.
#[derive(Default)]
struct ConnState {
    /// Requests that arrived while a slow call ran, to answer next.
    later: VecDeque<BytesMut>,
    /// The id of the last call answered with an error.
    last_failed: Option<u64>,
}

/// Answers one request; false when the connection must end.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    seen: &Seen,
    pid: u32,
    request: Request<'_>,
    state: &mut ConnState,
) -> bool {
    let (id, method, args, timeout_ms) = match request {
        Request::Call { id, method, args, timeout_ms, unless_failed_since } => {
            if let Some((since, failed)) = unless_failed_since.zip(state.last_failed)
                && failed >= since
            {
                seen.log(pid, format!("skip {method}"));
                let skipped = error(ErrorKind::Skipped, "an earlier call failed");
                let reply = Response::Reply {
                    id,
                    result: Err(skipped),
                    logs: vec![],
                    stats: CallStats::default(),
                };
                send(conn, &reply).await;
                return true;
            }
            (id, method, args, timeout_ms)
        }
        Request::CheckoutDone { id } => {
            seen.log(pid, "checkout_done");
            let error = seen.options.hook_fails.then(|| error(ErrorKind::CheckoutDoneFailed, "no"));
            send(conn, &Response::CheckoutDone { id, error, logs: vec![] }).await;
            return true;
        }
        Request::Hello { .. } => panic!("a second hello"),
    };
    seen.log(pid, format!("call {method}"));
    if let Some(ms) = timeout_ms {
        seen.log(pid, format!("timeout_ms {ms}"));
    }

    let pid_bytes = rmp_serde::to_vec(&pid).unwrap();
    let reply = |result| Response::Reply { id, result, logs: vec![], stats: CallStats::default() };
    match method {
        "echo" => {
            seen.echoed.lock().unwrap().push(args.to_vec());
            send(conn, &reply(Ok(Payload(args)))).await;
        }
        "pid" => send(conn, &reply(Ok(Payload(&pid_bytes)))).await,
        "slow" => {
            let hour = tokio::time::sleep(Duration::from_secs(3600));
            tokio::pin!(hour);
            loop {
                tokio::select! {
                    _ = &mut hour => break,
                    frame = conn.next() => match frame {
                        Some(Ok(frame)) => {
                            seen.log(pid, "request while busy");
                            state.later.push_back(frame);
                        }
                        _ => return false,
                    },
                }
            }
            send(conn, &reply(Ok(Payload(args)))).await;
        }
        "fail" => {
            state.last_failed = Some(id);
            send(conn, &reply(Err(error(ErrorKind::GuestError, "bad input")))).await;
        }
        "trap" => {
            let mut trap = error(ErrorKind::GuestTrap, "unreachable executed");
            trap.backtrace = Some("0: trap_here".into());
            send(conn, &reply(Err(trap))).await;
            return false;
        }
        "worker_timeout" => {
            send(conn, &reply(Err(error(ErrorKind::Timeout, "deadline reached")))).await;
            return false;
        }
        "hang_up" => return false,
        "truncate" => {
            let _ = conn.get_mut().write_all(&[0, 0, 0, 100, 1, 2, 3]).await;
            return false;
        }
        "huge" => {
            let _ = conn.get_mut().write_all(&(1u32 << 20).to_be_bytes()).await;
        }
        "garbage" => {
            let _ = conn.send(Bytes::from_static(&[0xc1])).await;
        }
        "wrong_id" => {
            let wrong = Response::Reply {
                id: id + 100,
                result: Ok(Payload(args)),
                logs: vec![],
                stats: CallStats::default(),
            };
            send(conn, &wrong).await;
        }
        "log" => {
            let logs = vec![
                LogRecord {
                    level: 2,
                    target: "guest::db".into(),
                    message: "cache cold".into(),
                    fields: vec![("key".into(), "k1".into())],
                    at_us: 7,
                },
                LogRecord {
                    level: 4,
                    target: "stdout".into(),
                    message: "hello".into(),
                    fields: vec![],
                    at_us: 9,
                },
            ];
            send(
                conn,
                &Response::Reply {
                    id,
                    result: Ok(Payload(args)),
                    logs,
                    stats: CallStats::default(),
                },
            )
            .await;
        }
        _ => {
            state.last_failed = Some(id);
            send(conn, &reply(Err(error(ErrorKind::UnknownMethod, "no such method")))).await;
        }
    }
    true
}

/// Polls `done` until it holds, pausing 1 ms (of virtual time, under a
/// paused clock) between tries; panics after 10 000 tries.
/// Polls `future` once, checks that it did not finish then, and returns it
/// pinned, to be awaited or dropped later (a call that has taken its place
/// on a checkout, say).
pub fn started<F: Future>(future: F) -> std::pin::Pin<Box<F>> {
    let mut future = Box::pin(future);
    assert!(future.as_mut().now_or_never().is_none(), "finished at its first poll");
    future
}

pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("gave up waiting until {what}");
}
