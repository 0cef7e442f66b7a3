//! A worker process: one connection, one guest instance, until the client leaves.

use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::MsgFlags;
use tracing::{debug, error, info, warn};

use super::guest::{Guest, Prepared, log_budget};
use super::hello::{Hello, source_of};
use super::modules::{LoadedModule, MEMORY_FOOTPRINT};
use super::seccomp::Filter;
use super::watchdog::{Bound, Watchdog};
use super::{harden, title};
use crate::protocol::{
    self, CallStats, ErrorKind, ErrorReply, FrameError, HelloReply, PROTOCOL_VERSION, Payload,
    Request, Response,
};

/// An accepted client connection.
pub enum Stream {
    /// A unix-domain socket connection.
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn dup_fd(&self) -> io::Result<OwnedFd> {
        self.as_fd().try_clone_to_owned()
    }

    /// The connection's descriptor number.
    pub fn raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }

    /// Switches the connection between blocking and non-blocking i/o.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(nonblocking),
            Stream::Tcp(s) => s.set_nonblocking(nonblocking),
        }
    }

    /// The connection's descriptor, for handing it to another process.
    pub fn into_fd(self) -> OwnedFd {
        match self {
            Stream::Unix(s) => s.into(),
            Stream::Tcp(s) => s.into(),
        }
    }

    /// A connection received as a bare descriptor.
    pub fn from_fd(fd: OwnedFd, unix: bool) -> Stream {
        if unix { Stream::Unix(fd.into()) } else { Stream::Tcp(fd.into()) }
    }

    /// Whether this is a unix-domain connection.
    pub fn is_unix(&self) -> bool {
        matches!(self, Stream::Unix(_))
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

/// The worker's reading end. When it finds no request waiting, it may poll
/// for one, yielding the CPU in between, for up to [`READ_SPIN`] before it
/// sleeps (see [`Eager::wait_read`]).
///
/// A worker waits for its next request for the client's turnaround: a
/// reply read, the next call made, or the worker handed to the next
/// checkout. With client and worker on different cores, that is tens of
/// microseconds, and a sleeping worker makes it longer: its core halts, and
/// waking a halted core costs the waker as much again on virtual machines.
/// Polling keeps the worker awake, so that a request finds it at once.
///
/// On the client's own core polling only gets in the way (a yield does not
/// always let the client run), and a worker cannot see where its client
/// runs, nor what a wake-up costs on the machine. So it tries both: every
/// [`SETTLED_READS`] reads it makes [`TRIAL_READS`] blocking and as many
/// polling, timing each, and then polls only if that shortened its mean
/// wait by a fifth or more. Short trials far apart cost little when
/// polling turns out to get in the way.
struct Eager {
    stream: Stream,
    /// Reads left in this phase.
    left: u32,
    /// Reads since the last look at the CPU-time backstop.
    since_look: u32,
    /// Whether this phase polls.
    poll: bool,
    phase: Phase,
    /// The waits measured in this phase (trials only): their sum and number.
    waited: Duration,
    waits: u32,
}

/// Where a worker's reader is in its cycle of trials.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Trying blocking reads.
    Blocking,
    /// Trying polling, after blocking reads that waited `blocking` on average.
    Polling { blocking: Duration },
    /// The mode is chosen until the next trial.
    Settled,
}

/// Size of a worker's read buffer.
const READ_BUFFER: usize = 4 << 10;

/// Longest a worker polls for data before it sleeps.
const READ_SPIN: Duration = Duration::from_micros(50);

/// Reads in each half of a trial.
const TRIAL_READS: u32 = 16;

/// Reads a choice holds for before the next trial.
const SETTLED_READS: u32 = 4096;

/// Fewest waits that make a trial's mean tell anything.
const MIN_WAITS: u32 = TRIAL_READS / 2;

/// CPU seconds kept allowed ahead of a worker reading requests.
const READING_ROOM_S: u64 = 2;

/// Reads between two looks at the CPU-time backstop: at most a few
/// milliseconds of CPU time, far within [`READING_ROOM_S`].
const LOOK_EVERY: u32 = 64;

/// Counted waits: a shorter read found its data waiting (calls sent ahead),
/// a longer one waited through a pause in the work. Neither tells whether
/// polling helps.
const COUNTED_WAITS: std::ops::Range<Duration> =
    Duration::from_micros(2)..Duration::from_micros(200);

impl Eager {
    fn new(stream: Stream) -> Eager {
        Eager {
            stream,
            left: TRIAL_READS,
            since_look: 0,
            poll: false,
            phase: Phase::Blocking,
            waited: Duration::ZERO,
            waits: 0,
        }
    }

    /// Ends a phase: takes the next step in the cycle of trials.
    fn next_phase(&mut self) {
        let mean = (self.waits >= MIN_WAITS).then(|| self.waited / self.waits);
        (self.waited, self.waits) = (Duration::ZERO, 0);
        (self.poll, self.phase) = match self.phase {
            Phase::Settled => (false, Phase::Blocking),
            Phase::Blocking => match mean {
                Some(blocking) => (true, Phase::Polling { blocking }),
                // Requests were waiting, or came after pauses: polling would
                // not shorten anything.
                None => (false, Phase::Settled),
            },
            // Polling costs CPU time: it must pay clearly.
            Phase::Polling { blocking } => {
                let poll = mean.is_some_and(|polling| polling * 5 <= blocking * 4);
                debug!(
                    poll,
                    blocking_us = blocking.as_micros() as u64,
                    polling_us = mean.map(|m| m.as_micros() as u64),
                    "waits for requests measured"
                );
                (poll, Phase::Settled)
            }
        };
        self.left = match self.phase {
            Phase::Settled => SETTLED_READS,
            Phase::Blocking | Phase::Polling { .. } => TRIAL_READS,
        };
    }

    /// Reads what is there, or else polls (if this phase does) and sleeps
    /// until something comes.
    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(read) = self.try_read(buf) {
            return read;
        }
        if self.poll {
            let started = Instant::now();
            loop {
                let _ = nix::sched::sched_yield();
                if let Some(read) = self.try_read(buf) {
                    return read;
                }
                if started.elapsed() >= READ_SPIN {
                    break;
                }
            }
        }
        self.wait_read(buf)
    }

    /// Sleeps until the client sends something, then reads it.
    ///
    /// It sleeps in `poll` rather than in a blocking read. A blocking read
    /// of a socket is woken by anything that wakes the socket's waiters: on
    /// unix sockets that includes the client reading the worker's last
    /// reply (which frees room to write), once per call, costing the client
    /// a wake-up of this process and the worker a trip through the
    /// scheduler for nothing. `poll` is woken only for what it waits for.
    fn wait_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut fd =
                libc::pollfd { fd: self.stream.raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: `fd` is one valid pollfd that outlives the call.
            if unsafe { libc::poll(&mut fd, 1, -1) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            // Ready (data, a hang-up or an error, which the read reports).
            if let Some(read) = self.try_read(buf) {
                return read;
            }
        }
    }

    /// Reads what is there without blocking; `None` when nothing is.
    fn try_read(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        match nix::sys::socket::recv(self.stream.raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => Some(Ok(n)),
            Err(Errno::EAGAIN) => None,
            Err(e) => Some(Err(e.into())),
        }
    }
}

impl Read for Eager {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.since_look += 1;
        if self.since_look == LOOK_EVERY {
            self.since_look = 0;
            // Reading takes CPU time outside any guest entry: keep the
            // CPU-time backstop ahead of it.
            harden::ensure_cpu_room(harden::thread_cpu(), READING_ROOM_S);
        }
        if self.left == 0 {
            self.next_phase();
        }
        self.left -= 1;
        if self.phase == Phase::Settled {
            return self.read_now(buf);
        }
        let started = Instant::now();
        let read = self.read_now(buf);
        let waited = started.elapsed();
        if COUNTED_WAITS.contains(&waited) {
            self.waited += waited;
            self.waits += 1;
        }
        read
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The daemon-wide settings a worker needs.
#[derive(Clone, Copy)]
pub struct Options<'a> {
    /// Largest frame accepted from the client or sent to it, in bytes.
    pub max_frame: usize,
    /// Longest any one guest entry may run.
    pub hung_timeout: Duration,
    /// The system-call filter to install before guest code runs, if any.
    pub filter: Option<&'a Filter>,
}

/// How a worker comes by its guest.
pub enum Start<'a> {
    /// Forked by the daemon: the worker instantiates the guest and runs its
    /// init hook itself.
    Fresh(&'a LoadedModule),
    /// Forked from the module's zygote, with the guest already built and
    /// the worker's preparations made while it waited for a client.
    Zygote(&'a LoadedModule, &'a mut Ready, HeadStart),
}

/// What a worker forked ahead of demand readied before its client came.
pub struct HeadStart {
    /// Whether walling in the process worked.
    pub walled: Result<(), ErrorReply>,
    /// Its watchdog, started.
    pub watchdog: io::Result<Watchdog>,
}

impl HeadStart {
    /// Walls in a worker forked from a zygote and starts its watchdog.
    pub fn new(options: &Options<'_>) -> HeadStart {
        HeadStart {
            walled: wall_in_forked(options.filter),
            watchdog: Watchdog::start(options.hung_timeout),
        }
    }
}

/// A guest instantiated and initialized, with its list of methods.
pub struct Ready {
    /// The guest.
    pub guest: Guest,
    /// What `wasm_task_methods` listed.
    pub methods: Vec<String>,
}

/// Instantiates a guest of `module` behind the worker's walls (`filter`
/// among them), runs its init hook and lists its methods: everything a
/// worker does before its per-worker setup. Zygotes do it once for all
/// their workers.
pub fn build_guest(
    module: &LoadedModule,
    log_limit: usize,
    filter: Option<&Filter>,
) -> Result<Ready, ErrorReply> {
    let mut guest = instantiate(module, log_limit, filter)?;
    let result = guest.init(module).and_then(|()| guest.methods(module));
    log_guest_records(&mut guest, "init");
    Ok(Ready { methods: result?, guest })
}

/// Serves one connection in a freshly forked process, then exits it.
///
/// Never returns: a worker must not fall back into the parent's code paths.
pub fn run(stream: Stream, start: Start<'_>, hello: &Hello, options: Options<'_>) -> ! {
    let span = tracing::info_span!("worker", worker.pid = std::process::id());
    // A panic must end this process here: unwinding further would run the
    // parent's code (and drop the parent's descriptors) in the child.
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        span.in_scope(|| Connection::new(stream, options).and_then(|mut c| c.serve(start, hello)))
    }));
    let code = span.in_scope(|| match served {
        Ok(Ok(())) => 0,
        Ok(Err(e @ ConnError::Refused(_))) => {
            // Debug formatting: the reason may quote the guest, which must
            // not be able to forge lines of the daemon's log.
            info!(reason = ?e.to_string(), "worker ends without serving");
            1
        }
        Ok(Err(ConnError::Frame(FrameError::Io(e)))) if client_left(&e) => {
            info!(error = %e, "client went away");
            0
        }
        Ok(Err(e)) => {
            warn!(error = %e, "worker ends on an error");
            1
        }
        Err(_) => {
            error!("worker panicked; exiting");
            101
        }
    });
    // SAFETY: ending the process without running the parent's exit-time
    // handlers, which belong to the daemon, not to this worker.
    unsafe { libc::_exit(code) }
}

/// Whether an i/o error just means the client closed its end.
fn client_left(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof)
}

/// The worker side of one connection.
struct Connection<'a> {
    reader: BufReader<Eager>,
    writer: Stream,
    options: Options<'a>,
    body: Vec<u8>,
    out: Vec<u8>,
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("refused the client: {0}")]
    Refused(String),
    #[error("starting the watchdog thread")]
    Watchdog(#[source] io::Error),
}

impl<'a> Connection<'a> {
    fn new(stream: Stream, options: Options<'a>) -> Result<Connection<'a>, ConnError> {
        // Small frames (and a few calls sent ahead) arrive in one read; the
        // body of a larger one goes from the socket straight into its
        // buffer, past this one, with no copy in between.
        let reader = BufReader::with_capacity(
            READ_BUFFER,
            Eager::new(stream.try_clone().map_err(FrameError::Io)?),
        );
        Ok(Connection { reader, writer: stream, options, body: Vec::new(), out: Vec::new() })
    }

    fn serve(&mut self, start: Start<'_>, hello: &Hello) -> Result<(), ConnError> {
        // The watchdog runs from the start: instantiation, init and setup
        // can hang as well as a call can.
        let (module, forked, watchdog) = match start {
            Start::Fresh(module) => (module, None, Watchdog::start(self.options.hung_timeout)),
            Start::Zygote(module, ready, head_start) => {
                (module, Some((ready, head_start.walled)), head_start.watchdog)
            }
        };
        let watchdog = watchdog.map_err(ConnError::Watchdog)?;
        watchdog.watch(self.writer.dup_fd().map_err(ConnError::Watchdog)?);
        title::set(&format!("wasm-task worker {}", module.name), &format!("wt:{}", module.name));
        info!(module = %module.name, client = ?hello.client, "client connected");

        let started = Instant::now();
        watchdog.attach(&module.engine);
        let bound = watchdog.begin(None);
        let mut fresh = None;
        let ready = match forked {
            None => build_guest(module, log_budget(self.options.max_frame), self.options.filter)
                .map(|built| &mut *fresh.insert(built)),
            Some((ready, walled)) => walled.map(|()| ready),
        };
        watchdog.end();
        let ready = match ready.map_err(|e| explain_timeout(e, bound, &self.options)) {
            Ok(ready) => ready,
            Err(e) => return Err(self.refuse_with(setup_failure(e))),
        };
        debug!(elapsed_us = started.elapsed().as_micros() as u64, "guest ready");
        let reply = self.start_guest(module, ready, &watchdog)?;
        self.send(&Response::Hello(reply))?;
        info!(module = %module.name, "worker ready");
        let guest = &mut ready.guest;
        // The id of the last call that failed, for calls sent behind it.
        let mut last_failed = None;

        loop {
            if !self.read()? {
                debug!("client closed the connection");
                return Ok(());
            }
            let request = match protocol::decode::<Request>(&self.body) {
                Ok(r) => r,
                Err(e) => {
                    return Err(self.refuse(ErrorKind::Protocol, format!("{e}: {}", source_of(&e))));
                }
            };
            let mut left_out = None;
            let fatal = match request {
                Request::Call { id, method, args, timeout_ms, unless_failed_since } => {
                    match unless_failed_since.zip(last_failed) {
                        Some((since, failed)) if failed >= since => {
                            skip(&mut self.out, id, failed)?;
                            false
                        }
                        _ => {
                            let timeout = timeout_ms.map(Duration::from_millis);
                            let options = self.options;
                            let outcome = call(
                                &mut self.out,
                                guest,
                                &watchdog,
                                id,
                                method,
                                args,
                                timeout,
                                options,
                            )?;
                            if outcome.failed {
                                last_failed = Some(id);
                            }
                            left_out = outcome.left_out;
                            outcome.fatal
                        }
                    }
                }
                Request::CheckoutDone { id } => {
                    let bound = watchdog.begin(None);
                    let result = guest.checkout_done();
                    watchdog.end();
                    let result = result.map_err(|e| explain_timeout(e, bound, &self.options));
                    let fatal = result.as_ref().is_err_and(|e| e.kind.is_fatal());
                    let error = result.err();
                    let logs = guest.take_logs();
                    protocol::encode_frame(
                        &Response::CheckoutDone { id, error, logs },
                        &mut self.out,
                    )?;
                    fatal
                }
                Request::Hello { .. } => {
                    return Err(self.refuse(ErrorKind::Protocol, "hello sent twice".into()));
                }
            };
            let (at, range) = left_out.unzip();
            let payload = range.map_or(&[][..], |r| &guest.data()[r]);
            protocol::write_frame_around(&mut self.writer, &self.out, at, payload)?;
            if fatal {
                info!("guest failed fatally; worker exits");
                return Ok(());
            }
        }
    }

    /// Runs the guest's per-worker setup hook.
    fn start_guest(
        &mut self,
        module: &LoadedModule,
        ready: &mut Ready,
        watchdog: &Watchdog,
    ) -> Result<HelloReply, ConnError> {
        let bound = watchdog.begin(None);
        let setup = ready.guest.setup(module);
        watchdog.end();
        let setup = setup.map_err(|e| explain_timeout(e, bound, &self.options));
        log_guest_records(&mut ready.guest, "setup");
        match setup {
            Ok(()) => Ok(HelloReply {
                version: PROTOCOL_VERSION,
                pid: std::process::id(),
                module: module.name.clone(),
                methods: ready.methods.clone(),
                checkout_done_hook: module.exports.checkout_done,
            }),
            Err(e) => Err(self.refuse_with(setup_failure(e))),
        }
    }

    /// Reads the next frame into `self.body`; `false` on a clean close.
    fn read(&mut self) -> Result<bool, ConnError> {
        match protocol::read_frame(&mut self.reader, &mut self.body, self.options.max_frame) {
            Ok(more) => Ok(more),
            Err(e @ (FrameError::TooLarge { .. } | FrameError::Truncated)) => {
                Err(self.refuse(ErrorKind::Protocol, e.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn send(&mut self, response: &Response<'_>) -> Result<(), ConnError> {
        protocol::encode_frame(response, &mut self.out)?;
        protocol::write_frame(&mut self.writer, &self.out)?;
        Ok(())
    }

    /// Tells the client why the connection ends (best effort) and returns the error.
    fn refuse(&mut self, kind: ErrorKind, message: String) -> ConnError {
        self.refuse_with(ErrorReply::new(kind, message))
    }

    fn refuse_with(&mut self, error: ErrorReply) -> ConnError {
        let message = error.message.clone();
        if let Err(e) = self.send(&Response::Refused(error)) {
            debug!(error = %e, "could not tell the client why");
        }
        ConnError::Refused(message)
    }
}

/// How a call went, for the serving loop.
struct Outcome {
    /// The reply is an error.
    failed: bool,
    /// The worker must exit after sending the reply.
    fatal: bool,
    /// Where the result, left in guest memory at the range given, belongs
    /// in the encoded reply (see [`protocol::encode_frame_around`]).
    left_out: Option<(usize, Range<usize>)>,
}

/// Answers a call sent behind call `failed`, which failed, without running it.
fn skip(out: &mut Vec<u8>, id: u64, failed: u64) -> Result<(), ConnError> {
    debug!(id, failed, "call skipped: an earlier call failed");
    let message = format!("not run: call {failed}, sent before it, failed");
    let error = ErrorReply::new(ErrorKind::Skipped, message);
    let reply =
        Response::Reply { id, result: Err(error), logs: Vec::new(), stats: CallStats::default() };
    protocol::encode_frame(&reply, out)?;
    Ok(())
}

/// Runs one call and encodes its reply into `out`.
#[allow(clippy::too_many_arguments)]
fn call(
    out: &mut Vec<u8>,
    guest: &mut Guest,
    watchdog: &Watchdog,
    id: u64,
    method: &str,
    args: &[u8],
    timeout: Option<Duration>,
    options: Options<'_>,
) -> Result<Outcome, ConnError> {
    let max_frame = options.max_frame;
    let started = Instant::now();
    debug!(method, timeout_ms = timeout.map(|t| t.as_millis() as u64), "calling");
    let bound = watchdog.begin_at(started, timeout);
    let result = guest.call(method, args);
    watchdog.end();
    let mut result = result.map_err(|e| explain_timeout(e, bound, &options));
    // Refuse an oversized result before encoding it: a copy of a result of
    // gigabytes could exhaust the worker's memory.
    if let Ok(r) = &result
        && r.len() > max_frame
    {
        let message =
            format!("reply of {} bytes exceeds the {max_frame} byte frame limit", r.len());
        result = Err(ErrorReply::new(ErrorKind::Limit, message));
    }
    let ended = Instant::now();
    let elapsed_us = ended.saturating_duration_since(started).as_micros() as u64;
    let stats = CallStats {
        wall_us: elapsed_us,
        cpu_us: watchdog.cpu_used(ended).as_micros() as u64,
        fuel: guest.fuel_used(),
    };
    let logs = guest.take_logs();
    let failed = result.is_err();
    let fatal = match &result {
        Ok(_) => {
            debug!(method, elapsed_us, "call succeeded");
            false
        }
        Err(e) => {
            debug!(method, elapsed_us, kind = ?e.kind, error = ?e.message, "call failed");
            e.kind.is_fatal()
        }
    };
    // The result goes out from guest memory, without a copy of it here.
    let data = guest.data();
    let range = result.as_ref().ok().cloned();
    let payload = range.clone().map_or(&[][..], |r| &data[r]);
    let result = result.map(|_| Payload(payload));
    let at =
        protocol::encode_frame_around(&Response::Reply { id, result, logs, stats }, payload, out)?;
    let len = out.len() - protocol::HEADER_LEN + at.map_or(0, |_| payload.len());
    if len > max_frame {
        // Too big to send: the client would drop the connection on it. Say
        // why instead, and retire the worker like any limit.
        let message = format!("reply of {len} bytes exceeds the {max_frame} byte frame limit");
        let error = ErrorReply::new(ErrorKind::Limit, message);
        let reply = Response::Reply { id, result: Err(error), logs: Vec::new(), stats };
        protocol::encode_frame(&reply, out)?;
        return Ok(Outcome { failed: true, fatal: true, left_out: None });
    }
    Ok(Outcome { failed, fatal, left_out: at.zip(range) })
}

/// Builds the guest's store, walls the process in, then instantiates.
///
/// The order matters: preopened directories are opened while the process
/// may still open files by path; the rlimits and the system-call filter are
/// in place before the first instruction of the guest runs.
fn instantiate(
    module: &LoadedModule,
    log_limit: usize,
    filter: Option<&Filter>,
) -> Result<Guest, ErrorReply> {
    let prepared = Prepared::new(module, log_limit)?;
    // WASI's sync calls run on a runtime of its own, started on a guest's
    // first file, stream or poll call; the filter allows what starting it
    // needs (a thread, an epoll instance, an eventfd, a socket pair), so
    // guests that never make such a call never pay for it.
    lock_down(module, filter).map_err(|e| ErrorReply {
        kind: ErrorKind::SetupFailed,
        message: format!("walling in the worker: {e}"),
        backtrace: None,
    })?;
    prepared.instantiate(module)
}

/// Sets the worker's rlimits and installs its system-call filter.
fn lock_down(module: &LoadedModule, filter: Option<&Filter>) -> io::Result<()> {
    let limits = &module.settings.limits;
    let reserved = MEMORY_FOOTPRINT.saturating_mul(limits.memories as u64);
    let space = harden::set_rlimits(limits, reserved)
        .map_err(|e| io::Error::other(format!("setting rlimits: {e}")))?;
    if let Some(filter) = filter {
        filter
            .install(std::process::id())
            .map_err(|e| io::Error::other(format!("installing seccomp: {e}")))?;
    }
    debug!(
        address_space_mib = space.at_start >> 20,
        rlimit_as_mib = space.cap >> 20,
        rlimit_nofile = limits.files,
        seccomp_steps = filter.map_or(0, Filter::len),
        "worker walled in"
    );
    Ok(())
}

/// Walls in a worker forked from a zygote: the zygote's rlimits and filter
/// carry over; the worker filter on top takes back what only a zygote may
/// do (fork) and fills in this process's id.
pub fn wall_in_forked(filter: Option<&Filter>) -> Result<(), ErrorReply> {
    let Some(filter) = filter else { return Ok(()) };
    filter.install(std::process::id()).map_err(|e| ErrorReply {
        kind: ErrorKind::SetupFailed,
        message: format!("walling in the worker: installing seccomp: {e}"),
        backtrace: None,
    })
}

/// Writes the log records a guest made outside any call (in init or setup)
/// to the daemon's log.
pub fn log_guest_records(guest: &mut Guest, during: &str) {
    for record in guest.take_logs() {
        // Debug formatting escapes what the guest wrote, so it cannot
        // forge lines of the daemon's log.
        info!(
            target: "wasm_task::guest",
            level = record.level,
            guest_target = ?record.target,
            message = ?record.message,
            during,
            "guest log outside a call"
        );
    }
}

/// A timeout that came from the hung-worker timeout says so.
fn explain_timeout(mut e: ErrorReply, bound: Bound, options: &Options<'_>) -> ErrorReply {
    if e.kind == ErrorKind::Timeout && bound == Bound::Hung {
        e.message = format!(
            "guest interrupted at the daemon's hung-worker timeout of {:?}",
            options.hung_timeout
        );
    }
    e
}

/// Failures before the worker is ready all read as setup failures to the
/// client, keeping the guest's own message.
fn setup_failure(mut e: ErrorReply) -> ErrorReply {
    if e.kind != ErrorKind::Protocol {
        e.kind = ErrorKind::SetupFailed;
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reading end kept in the given mode, and the writing end.
    fn pair(poll: bool) -> (BufReader<Eager>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut eager = Eager::new(Stream::Unix(ours));
        eager.poll = poll;
        (eager.phase, eager.left) = (Phase::Settled, u32::MAX);
        (BufReader::with_capacity(16, eager), theirs)
    }

    /// Ends a phase of `eager` in which it waited `mean` on average for
    /// `waits` reads.
    fn phase(eager: &mut Eager, waits: u32, mean: Duration) {
        (eager.waited, eager.waits) = (mean * waits, waits);
        eager.next_phase();
    }

    #[test]
    fn polls_only_where_the_trial_shows_it_shortens_the_waits() {
        let us = Duration::from_micros;
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let mut eager = Eager::new(Stream::Unix(ours));
        assert_eq!((eager.poll, eager.phase), (false, Phase::Blocking), "starts with a trial");

        // Client on another core: polling cuts the wait from 40 to 10 µs.
        phase(&mut eager, TRIAL_READS, us(40));
        assert_eq!((eager.poll, eager.phase), (true, Phase::Polling { blocking: us(40) }));
        assert_eq!(eager.left, TRIAL_READS);
        phase(&mut eager, TRIAL_READS, us(10));
        assert_eq!((eager.poll, eager.phase, eager.left), (true, Phase::Settled, SETTLED_READS));

        // Client on the same core: polling makes the wait no shorter.
        phase(&mut eager, 0, Duration::ZERO);
        assert_eq!((eager.poll, eager.phase), (false, Phase::Blocking), "the next trial");
        phase(&mut eager, TRIAL_READS, us(10));
        phase(&mut eager, TRIAL_READS, us(9));
        assert_eq!((eager.poll, eager.phase), (false, Phase::Settled));

        // Requests found waiting, or after pauses: nothing to measure.
        phase(&mut eager, 0, Duration::ZERO);
        phase(&mut eager, MIN_WAITS - 1, us(40));
        assert_eq!((eager.poll, eager.phase), (false, Phase::Settled));
        // A polling trial that saw too little does not turn polling on.
        phase(&mut eager, 0, Duration::ZERO);
        phase(&mut eager, TRIAL_READS, us(40));
        phase(&mut eager, MIN_WAITS - 1, us(1));
        assert!(!eager.poll);
    }

    #[test]
    fn frames_arrive_whole_whether_polling_or_blocking() {
        for poll in [false, true] {
            let (mut reader, mut writer) = pair(poll);
            let sent: Vec<Vec<u8>> =
                (0..200u32).map(|i| vec![i as u8; (i % 50) as usize]).collect();
            let frames = sent.clone();
            let feeder = std::thread::spawn(move || {
                for (i, body) in frames.iter().enumerate() {
                    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
                    frame.extend_from_slice(body);
                    // Some frames wait for the reader, some are there before it.
                    if i % 3 == 0 {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    writer.write_all(&frame).unwrap();
                }
            });
            let mut body = Vec::new();
            for want in &sent {
                assert!(protocol::read_frame(&mut reader, &mut body, 1 << 20).unwrap());
                assert_eq!(&body, want, "polling: {poll}");
            }
            feeder.join().unwrap();
            // Past every probe, in either mode, the close reads as the end.
            assert!(!protocol::read_frame(&mut reader, &mut body, 1 << 20).unwrap());
        }
    }

    /// A worker spends CPU time reading requests, outside any guest entry
    /// (polling for a request that trickles in, most of all): the CPU-time
    /// backstop must keep ahead of it, or the kernel kills the worker with
    /// SIGXCPU in the middle of a read.
    #[test]
    fn reading_keeps_the_cpu_backstop_ahead() {
        let (mut reader, mut writer) = pair(false);
        // 256 reads of the 16-byte buffer: four looks at the backstop.
        writer.write_all(&[7u8; 4096]).unwrap();
        drop(writer);
        // SAFETY: the child reads from its socket and spins, without
        // allocating, then leaves with _exit.
        let child = unsafe { libc::fork() };
        if child == 0 {
            harden::enable_cpu_backstop();
            // One CPU second of room, as a short entry's backstop may leave.
            let used = harden::thread_cpu().as_secs();
            let limit = libc::rlimit { rlim_cur: used + 1, rlim_max: libc::RLIM_INFINITY };
            // SAFETY: a valid rlimit for the duration of the call.
            unsafe { libc::setrlimit(libc::RLIMIT_CPU, &limit) };
            // Half a millisecond of CPU per byte: two seconds in all.
            let mut byte = [0u8; 1];
            let code = loop {
                match reader.read(&mut byte) {
                    Ok(0) => break 0,
                    Ok(_) => {
                        let from = harden::thread_cpu();
                        while harden::thread_cpu() - from < Duration::from_micros(500) {}
                    }
                    Err(_) => break 2,
                }
            };
            // SAFETY: leave the forked test process at once.
            unsafe { libc::_exit(code) };
        }
        drop(reader);
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the reader ended with status {status:#x} (signal {})",
            libc::WTERMSIG(status)
        );
    }

    #[test]
    fn a_close_while_polling_ends_the_read() {
        let (mut reader, writer) = pair(true);
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            drop(writer);
        });
        assert!(!protocol::read_frame(&mut reader, &mut Vec::new(), 1 << 20).unwrap());
        closer.join().unwrap();
    }
}
