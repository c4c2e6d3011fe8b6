//! A process's stdio: containerd's side (FIFOs, `file://` and `binary://` log URIs) ↔ the
//! agent's stream connections (one connection per stream, raw bytes after the PVS1 header;
//! see `agent.proto`), copied by one thread per stream.
//!
//! - FIFO paths are opened without ever blocking in open(2), as containerd's own fifo
//!   package does: a client may never open its end (`ctr` gives up its stdin FIFO when its
//!   own stdin is at EOF before the shim opened it; a detached client goes away), and a
//!   thread blocked in open(2) could not be told to stop.
//!   - stdin is opened `O_RDONLY|O_NONBLOCK` and read when poll(2) says so. Linux reports
//!     neither input nor hang-up on such a FIFO until a writer has come, so "no writer yet"
//!     waits and EOF means the client closed its end; EOF half-closes the agent stream,
//!     which closes the process's stdin. The copy also ends when told to
//!     ([`StdinState::close`], or its last handle dropped) and when the agent hangs up the
//!     stream: a released process holds no thread, FIFO or connection. (`O_RDWR` would
//!     not block either, but the shim's own write end would hide the client's EOF.)
//!   - stdout/stderr are opened `O_WRONLY|O_NONBLOCK`; while containerd has no reader
//!     (`ENXIO`) the copy retries until one comes or the agent has shut the stream down
//!     (the process is gone and nobody wants its output). Writes then block: a reader that
//!     goes away gets the copy an `EPIPE`.
//! - `file:///path`: stdout and stderr appended to one host file.
//! - `binary:///path?arg=value`: a logging program started by the shim, as containerd's runc
//!   shim does: fd 3 = stdout, fd 4 = stderr, fd 5 closed by the program once it is ready;
//!   `CONTAINER_ID` and `CONTAINER_NAMESPACE` in its environment.
//! - terminal: one `pty` stream carries both directions; stdout receives the terminal output.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a `binary://` logger may take to signal that it is ready.
const LOGGER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an output copy looks again for containerd's reader of its FIFO, at most.
const READER_RETRY_MAX: Duration = Duration::from_millis(500);

/// The stdio containerd gave for a process; empty = not wired.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Where a process's output goes on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSink {
    /// containerd's FIFO (or any path), opened for writing per stream.
    Path(String),
    /// `file://`: appended to this file.
    File(PathBuf),
    /// `binary://`: a logging program and its arguments.
    Binary { path: PathBuf, args: Vec<String> },
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl OutputSink {
    /// Parses containerd's stdout/stderr value.
    pub fn parse(value: &str) -> Result<OutputSink, String> {
        let Some((scheme, rest)) = value.split_once("://") else {
            return Ok(OutputSink::Path(value.to_string()));
        };
        if !matches!(scheme, "file" | "binary") {
            return Err(format!(
                "{value:?}: log URI scheme {scheme:?} is not supported (fifo paths, file://, binary://)"
            ));
        }
        // The URI's path (after an empty host) and query.
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = percent_decode(path);
        if !path.starts_with('/') {
            return Err(format!(
                "{value:?}: the log URI needs an absolute path ({scheme}:///path)"
            ));
        }
        match scheme {
            "file" => Ok(OutputSink::File(PathBuf::from(path))),
            "binary" => {
                let mut args = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    args.push(percent_decode(k));
                    if !v.is_empty() {
                        args.push(percent_decode(v));
                    }
                }
                Ok(OutputSink::Binary {
                    path: PathBuf::from(path),
                    args,
                })
            }
            _ => unreachable!("scheme checked above"),
        }
    }
}

/// The host ends a process's output streams are copied to.
pub struct OutputWriters {
    pub stdout: Option<Writer>,
    pub stderr: Option<Writer>,
    /// A `binary://` logger; waited for when the process is deleted.
    pub logger: Option<Child>,
}

/// One output destination: a path opened by the copy thread once it has a reader, or an
/// open file shared by stdout and stderr.
#[derive(Clone)]
pub enum Writer {
    Path(String),
    Shared(Arc<File>),
}

impl Writer {
    /// The open destination; `None` when `conn`'s peer finished before a FIFO at the path had
    /// a reader.
    fn open(&self, conn: &UnixStream) -> io::Result<Option<Box<dyn Write + Send>>> {
        Ok(Some(match self {
            Writer::Path(p) => match open_for_writing(p, conn)? {
                Some(f) => Box::new(f),
                None => return Ok(None),
            },
            Writer::Shared(f) => Box::new(SharedFile(f.clone())),
        }))
    }
}

/// Opens `path` for writing without blocking in open(2): a FIFO without a reader (`ENXIO`)
/// is tried again until it has one, or `None` once `conn`'s peer has sent all it will (the
/// process is gone). The file is returned in blocking mode.
fn open_for_writing(path: &str, conn: &UnixStream) -> io::Result<Option<File>> {
    let mut retry = Duration::from_millis(10);
    loop {
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => {
                clear_nonblocking(f.as_fd())?;
                return Ok(Some(f));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                // The agent shuts its side down once the process's output is all sent.
                if poll(&mut [watch(conn.as_fd(), libc::POLLRDHUP)], Some(retry))? > 0 {
                    log::debug!("{path}: no reader came before the process's stream ended");
                    return Ok(None);
                }
                retry = (retry * 2).min(READER_RETRY_MAX);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Clears `O_NONBLOCK` on `fd`'s open file description.
fn clear_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor the caller keeps open; no memory is passed.
    let ok = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) >= 0
    };
    if ok {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A `pollfd` for `fd` and `events` (0: only hang-up and errors, which poll(2) always
/// reports).
fn watch(fd: BorrowedFd<'_>, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// poll(2) on `fds` for up to `timeout` (`None`: no limit), retried on `EINTR` with the
/// whole timeout; how many have events.
fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = timeout.map_or(-1, |t| {
        libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX)
    });
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfds whose
        // descriptors the caller keeps open for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

struct SharedFile(Arc<File>);

impl Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        (&*self.0).flush()
    }
}

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts a `binary://` logger for a process of `container` and waits until it is ready.
fn start_logger(
    path: &PathBuf,
    args: &[String],
    container: &str,
    namespace: &str,
) -> Result<(Child, File, File), String> {
    let err = |e: io::Error| format!("logging binary {}: {e}", path.display());
    let (out_r, out_w) = pipe().map_err(err)?;
    let (err_r, err_w) = pipe().map_err(err)?;
    let (ready_r, ready_w) = pipe().map_err(err)?;
    let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = Command::new(path);
    cmd.args(args)
        .env("CONTAINER_ID", container)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: the closure only calls fcntl and dup2, which are async-signal-safe; the source
    // fds stay open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way (a source may already sit on 3, 4 or 5), then into place;
            // the high copies are close-on-exec, the dup2 targets are not.
            let mut high = [0; 3];
            for (h, fd) in high.iter_mut().zip(fds) {
                *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if *h < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (target, h) in (3..).zip(high) {
                if libc::dup2(h, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(err)?;
    drop((out_r, err_r, ready_w));
    // Ready: the logger closed fd 5 (EOF on our end), or exited.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut ready = File::from(ready_r);
    let waiter = std::thread::Builder::new()
        .name("logger-ready".into())
        .spawn(move || {
            let mut b = [0u8; 1];
            let _ = tx.send(ready.read(&mut b));
        });
    if let Err(e) = waiter {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "no thread to wait for logging binary {}: {e}",
            path.display()
        ));
    }
    if rx.recv_timeout(LOGGER_READY_TIMEOUT).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "logging binary {} did not close fd 5 within {LOGGER_READY_TIMEOUT:?}",
            path.display()
        ));
    }
    Ok((child, File::from(out_w), File::from(err_w)))
}

impl StdioPaths {
    /// The host ends for stdout and stderr (starting a `binary://` logger if asked).
    pub fn output_writers(
        &self,
        container: &str,
        namespace: &str,
    ) -> Result<OutputWriters, String> {
        let mut w = OutputWriters {
            stdout: None,
            stderr: None,
            logger: None,
        };
        if self.stdout.is_empty() && self.stderr.is_empty() {
            return Ok(w);
        }
        let uri = if self.stdout.is_empty() {
            &self.stderr
        } else {
            &self.stdout
        };
        match OutputSink::parse(uri)? {
            OutputSink::Path(_) => {
                for p in [&self.stdout, &self.stderr] {
                    if p.contains("://") {
                        return Err(format!(
                            "{p:?}: stdout and stderr must both be paths or the same log URI"
                        ));
                    }
                }
                w.stdout = (!self.stdout.is_empty()).then(|| Writer::Path(self.stdout.clone()));
                w.stderr = (!self.stderr.is_empty()).then(|| Writer::Path(self.stderr.clone()));
            }
            OutputSink::File(path) => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| format!("log file {}: {e}", path.display()))?;
                }
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| format!("log file {}: {e}", path.display()))?;
                let f = Writer::Shared(Arc::new(f));
                w.stdout = Some(f.clone());
                w.stderr = Some(f);
            }
            OutputSink::Binary { path, args } => {
                let (child, out, err) = start_logger(&path, &args, container, namespace)?;
                w.stdout = Some(Writer::Shared(Arc::new(out)));
                w.stderr = Some(Writer::Shared(Arc::new(err)));
                w.logger = Some(child);
            }
        }
        if self.terminal {
            // The pty merges both: only stdout carries it.
            w.stderr = None;
        }
        Ok(w)
    }
}

/// Called once, when the first bytes of an output stream arrived.
pub type FirstBytes = Box<dyn FnOnce() + Send>;

/// Reads through `inner`, calling `first` when the first bytes arrive.
struct Watched<R> {
    inner: R,
    first: Option<FirstBytes>,
}

impl<R: io::Read> io::Read for Watched<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            if let Some(first) = self.first.take() {
                first();
            }
        }
        Ok(n)
    }
}

/// Copies an output stream (agent → host) until the agent closes it, in a thread of its
/// own (the error: no thread could be started). `first` runs when the first bytes arrive.
pub fn copy_output(
    conn: UnixStream,
    to: Writer,
    first: Option<FirstBytes>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("stdio-out".into())
        .spawn(move || {
            let result = to.open(&conn).and_then(|w| {
                let Some(mut w) = w else {
                    return Ok(0);
                };
                let mut watched = Watched {
                    inner: &conn,
                    first,
                };
                let n = io::copy(&mut watched, &mut w)?;
                w.flush()?;
                Ok(n)
            });
            match result {
                Ok(n) => log::debug!("output: {n} bytes copied"),
                Err(e) => log::warn!("copying output: {e}"),
            }
        })
}

/// An eventfd that tells a copy thread to stop; polled next to the copy's descriptors.
#[derive(Debug)]
struct StopSignal(OwnedFd);

impl StopSignal {
    fn new() -> io::Result<StopSignal> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(StopSignal(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Raises the signal (it stays raised).
    fn raise(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes the 8 bytes of `one` to an eventfd this struct owns. A full counter
        // (EAGAIN) is raised already; nothing else can fail here.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// What the stdin copy thread and its handles share.
#[derive(Debug)]
struct StdinShared {
    bytes: AtomicU64,
    done: (Mutex<bool>, Condvar),
    /// `None` when the eventfd could not be created: the copy then runs without it and
    /// ends only at EOF or when the agent hangs up.
    stop: Option<StopSignal>,
}

/// The release point of a stdin copy: the last handle to go stops it.
#[derive(Debug)]
struct StdinHandle {
    shared: Arc<StdinShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl StdinHandle {
    fn stop(&self) {
        if let Some(stop) = &self.shared.stop {
            stop.raise();
        }
    }
}

impl Drop for StdinHandle {
    fn drop(&mut self) {
        // The thread ends by itself right after; it is not waited for here.
        self.stop();
    }
}

/// The stdin copy of a process: how many bytes went to the agent, whether it ended, and
/// the way to end it. Clones share one copy; when the last clone is dropped the copy is
/// told to stop (its thread then closes the FIFO and the agent stream by itself).
#[derive(Clone, Debug)]
pub struct StdinState {
    handle: Arc<StdinHandle>,
}

impl StdinState {
    fn new(stop: Option<StopSignal>) -> StdinState {
        StdinState {
            handle: Arc::new(StdinHandle {
                shared: Arc::new(StdinShared {
                    bytes: AtomicU64::new(0),
                    done: (Mutex::new(false), Condvar::new()),
                    stop,
                }),
                thread: Mutex::new(None),
            }),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.handle.shared.bytes.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for the copy to end (EOF, closed, or the agent hung up);
    /// whether it did.
    pub fn wait_done(&self, timeout: Duration) -> bool {
        let (lock, cv) = &self.handle.shared.done;
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |done| !*done)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }

    /// Ends the copy now, whether or not the client ever opened or closed its FIFO, and
    /// waits for its thread: the FIFO and the agent stream are closed when this returns.
    /// What the copy had forwarded stays forwarded; the stream is not half-closed.
    pub fn close(&self) {
        self.handle.stop();
        let thread = self
            .handle
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// How a stdin copy ended without an error.
#[derive(Debug, PartialEq, Eq)]
enum StdinEnd {
    /// The client closed its end of the FIFO.
    Eof,
    /// Told to stop.
    Stopped,
    /// The agent hung up the stream: the process is gone.
    HungUp,
}

/// Copies containerd's stdin (a FIFO) into the agent's stdin (or pty) stream; at EOF
/// half-closes the stream, which closes the process's stdin. Ends early when the returned
/// state is closed or dropped, or when the agent hangs up the stream. The error: no thread
/// could be started.
pub fn copy_input(path: String, conn: UnixStream) -> io::Result<StdinState> {
    let stop = StopSignal::new()
        .inspect_err(|e| log::warn!("stdin {path}: no stop signal ({e}); it ends at EOF only"))
        .ok();
    let state = StdinState::new(stop);
    let shared = state.handle.shared.clone();
    let thread = std::thread::Builder::new()
        .name("stdio-in".into())
        .spawn(move || {
            let result = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .and_then(|fifo| copy_stdin(&fifo, &conn, &shared));
            match result {
                Ok(StdinEnd::Eof) => {
                    let _ = conn.shutdown(Shutdown::Write);
                }
                Ok(end) => log::debug!("stdin {path}: {end:?}"),
                Err(e) => {
                    log::debug!("copying stdin from {path}: {e}");
                    let _ = conn.shutdown(Shutdown::Write);
                }
            }
            let (lock, cv) = &shared.done;
            *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
            cv.notify_all();
        })?;
    *state
        .handle
        .thread
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(thread);
    Ok(state)
}

/// Waits until `fd` has one of `events`, the stop signal is raised or `conn`'s peer hung
/// up; `None` when the copy is to end (stopped or hung up, as the `StdinEnd`).
fn wait_for(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    conn: &UnixStream,
    shared: &StdinShared,
) -> io::Result<Option<StdinEnd>> {
    let mut fds = vec![watch(fd, events), watch(conn.as_fd(), 0)];
    if let Some(stop) = &shared.stop {
        fds.push(watch(stop.0.as_fd(), libc::POLLIN));
    }
    poll(&mut fds, None)?;
    if fds.get(2).is_some_and(|s| s.revents != 0) {
        return Ok(Some(StdinEnd::Stopped));
    }
    if fds[1].revents != 0 {
        return Ok(Some(StdinEnd::HungUp));
    }
    if fds[0].revents & libc::POLLNVAL != 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    Ok(None)
}

/// The stdin copy loop: `fifo` (non-blocking) into `conn` until EOF, stop or hang-up.
fn copy_stdin(fifo: &File, conn: &UnixStream, shared: &StdinShared) -> io::Result<StdinEnd> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(end) = wait_for(fifo.as_fd(), libc::POLLIN, conn, shared)? {
            return Ok(end);
        }
        // Drain what is there. After poll reported the FIFO, 0 bytes means every writer
        // (there was one) closed its end: EOF.
        loop {
            let n = match (&*fifo).read(&mut buf) {
                Ok(0) => return Ok(StdinEnd::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if let Some(end) = send_all(conn, &buf[..n], shared)? {
                return Ok(end);
            }
            shared.bytes.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
}

/// Writes all of `data` to `conn` without blocking in send(2) (a pty stream's descriptor
/// is shared with its output copy, so `O_NONBLOCK` is not set on it); `Some` when the copy
/// is to end first.
fn send_all(
    conn: &UnixStream,
    mut data: &[u8],
    shared: &StdinShared,
) -> io::Result<Option<StdinEnd>> {
    while !data.is_empty() {
        // SAFETY: sends from `data`, valid for `data.len()` bytes, on a socket `conn` keeps
        // open; MSG_DONTWAIT makes this one call non-blocking, MSG_NOSIGNAL turns SIGPIPE
        // into EPIPE.
        let n = unsafe {
            libc::send(
                conn.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if let Ok(n) = usize::try_from(n) {
            data = &data[n..];
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => {
                if let Some(end) = wait_for(conn.as_fd(), libc::POLLOUT, conn, shared)? {
                    return Ok(Some(end));
                }
            }
            io::ErrorKind::Interrupted => {}
            _ => return Err(e),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_log_uris() {
        assert_eq!(
            OutputSink::parse("/run/c/fifo").unwrap(),
            OutputSink::Path("/run/c/fifo".into())
        );
        assert_eq!(
            OutputSink::parse("file:///var/log/c%201.log").unwrap(),
            OutputSink::File("/var/log/c 1.log".into())
        );
        assert_eq!(
            OutputSink::parse("binary:///usr/bin/logger?--tag=x&-v").unwrap(),
            OutputSink::Binary {
                path: "/usr/bin/logger".into(),
                args: vec!["--tag".into(), "x".into(), "-v".into()]
            }
        );
        assert!(OutputSink::parse("http://x/y")
            .unwrap_err()
            .contains("not supported"));
        assert!(OutputSink::parse("file://relative")
            .unwrap_err()
            .contains("absolute"));
    }

    #[test]
    fn file_uri_appends_both_streams_to_one_file() {
        let dir = std::env::temp_dir().join(format!("podvisor-stdio-{}", std::process::id()));
        let log = dir.join("sub/c.log");
        let paths = StdioPaths {
            stdout: format!("file://{}", log.display()),
            stderr: format!("file://{}", log.display()),
            ..Default::default()
        };
        let w = paths.output_writers("c", "default").unwrap();
        for (writer, text) in [(w.stdout.unwrap(), "out\n"), (w.stderr.unwrap(), "err\n")] {
            let (a, mut b) = UnixStream::pair().unwrap();
            b.write_all(text.as_bytes()).unwrap();
            drop(b);
            copy_output(a, writer, None).unwrap().join().unwrap();
        }
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "out\nerr\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_first_bytes_of_an_output_are_reported_once() {
        let dir = std::env::temp_dir().join(format!("podvisor-first-{}", std::process::id()));
        let paths = StdioPaths {
            stdout: format!("file://{}", dir.join("c.log").display()),
            ..Default::default()
        };
        let w = paths.output_writers("c", "default").unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = copy_output(
            a,
            w.stdout.unwrap(),
            Some(Box::new(move || tx.send(()).unwrap())),
        )
        .unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "nothing was written yet"
        );
        b.write_all(b"one").unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        b.write_all(b" two").unwrap();
        drop(b);
        t.join().unwrap();
        assert!(rx.try_recv().is_err(), "reported once");
        assert_eq!(
            std::fs::read_to_string(dir.join("c.log")).unwrap(),
            "one two"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn binary_uri_runs_the_logger_with_fds_3_4_5() {
        let dir = std::env::temp_dir().join(format!("podvisor-logger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("logger.sh");
        let out = dir.join("out");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec 5>&-\ncat <&3 > {o}.1 & cat <&4 > {o}.2 & wait\necho \"$CONTAINER_ID $CONTAINER_NAMESPACE $1\" > {o}.env\n",
                o = out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let uri = format!("binary://{}?arg1", script.display());
        let paths = StdioPaths {
            stdout: uri.clone(),
            stderr: uri,
            ..Default::default()
        };
        let w = paths.output_writers("ctr1", "ns1").unwrap();
        let mut logger = w.logger.unwrap();
        for (writer, text) in [
            (w.stdout.unwrap(), "to-stdout"),
            (w.stderr.unwrap(), "to-stderr"),
        ] {
            let (a, mut b) = UnixStream::pair().unwrap();
            b.write_all(text.as_bytes()).unwrap();
            drop(b);
            copy_output(a, writer, None).unwrap().join().unwrap();
        }
        assert!(logger.wait().unwrap().success());
        let read = |s: &str| std::fs::read_to_string(format!("{}.{s}", out.display())).unwrap();
        assert_eq!(read("1"), "to-stdout");
        assert_eq!(read("2"), "to-stderr");
        assert_eq!(read("env"), "ctr1 ns1 arg1\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stdin_counts_bytes_and_half_closes() {
        let dir = std::env::temp_dir().join(format!("podvisor-stdin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("in");
        std::fs::write(&file, "hello").unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let st = copy_input(file.to_string_lossy().into_owned(), a).unwrap();
        let mut got = String::new();
        b.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello");
        assert!(st.wait_done(Duration::from_secs(5)));
        assert_eq!(st.bytes(), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A FIFO in a fresh temp dir: (dir, fifo).
    fn fifo(name: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("podvisor-fifo-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fifo");
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path and nothing else.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo: {}", io::Error::last_os_error());
        (dir, path)
    }

    /// How many of this process's descriptors are open on `path`.
    fn fds_on(path: &std::path::Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
            .count()
    }

    /// Whether `f` holds within 5 s.
    fn within_5s(mut f: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !f() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Reads `conn` to its end (bounded by a 5 s timeout per read).
    fn read_to_end(conn: &mut UnixStream) -> String {
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        got
    }

    /// A stdin copy from a fresh FIFO that no client opened yet, once the copy has opened it:
    /// (dir, fifo, state, the agent's end of the stream).
    fn started_stdin(name: &str) -> (PathBuf, PathBuf, StdinState, UnixStream) {
        let (dir, path) = fifo(name);
        let (a, b) = UnixStream::pair().unwrap();
        let st = copy_input(path.to_string_lossy().into_owned(), a).unwrap();
        // open(2) did not wait for a writer.
        assert!(within_5s(|| fds_on(&path) == 1), "the copy opens the FIFO");
        (dir, path, st, b)
    }

    #[test]
    fn stdin_fifo_nobody_opens_is_released_on_close() {
        let (dir, path, st, mut b) = started_stdin("stdin-close");
        assert!(!st.wait_done(Duration::from_millis(100)));
        let (tx, rx) = std::sync::mpsc::channel();
        let closer = st.clone();
        std::thread::spawn(move || {
            closer.close();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("close ends the copy thread");
        assert!(st.wait_done(Duration::ZERO));
        assert_eq!(fds_on(&path), 0, "the FIFO is closed");
        assert_eq!(read_to_end(&mut b), "", "the agent stream is closed");
        assert_eq!(st.bytes(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stdin_copy_stops_when_its_last_handle_is_dropped() {
        let (dir, path, st, mut b) = started_stdin("stdin-drop");
        let other = st.clone();
        drop(st);
        assert_eq!(fds_on(&path), 1, "a clone keeps the copy");
        drop(other);
        assert!(within_5s(|| fds_on(&path) == 0), "the FIFO is closed");
        assert_eq!(read_to_end(&mut b), "", "the agent stream is closed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stdin_fifo_data_reaches_the_stream_and_eof_half_closes_it() {
        let (dir, path, st, mut b) = started_stdin("stdin-data");
        // The client's end.
        let mut writer = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        writer.write_all(b"abc").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 3];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");
        assert!(
            !st.wait_done(Duration::from_millis(50)),
            "no EOF while open"
        );
        writer.write_all(b"def").unwrap();
        drop(writer);
        assert_eq!(read_to_end(&mut b), "def", "EOF half-closes the stream");
        assert!(st.wait_done(Duration::from_secs(5)));
        assert_eq!(st.bytes(), 6);
        assert!(within_5s(|| fds_on(&path) == 0), "the FIFO is closed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stdin_copy_ends_when_the_agent_hangs_up() {
        let (dir, path, st, b) = started_stdin("stdin-hangup");
        drop(b);
        assert!(st.wait_done(Duration::from_secs(5)));
        assert!(within_5s(|| fds_on(&path) == 0), "the FIFO is closed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An output copy to a fresh FIFO with "early " sent by the agent: (dir, fifo, thread,
    /// the agent's end of the stream).
    fn started_output(name: &str) -> (PathBuf, PathBuf, JoinHandle<()>, UnixStream) {
        let (dir, path) = fifo(name);
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = copy_output(a, Writer::Path(path.to_string_lossy().into_owned()), None).unwrap();
        b.write_all(b"early ").unwrap();
        (dir, path, t, b)
    }

    #[test]
    fn output_fifo_without_a_reader_ends_with_the_stream() {
        let (dir, path, t, b) = started_output("out-noreader");
        drop(b);
        assert!(within_5s(|| t.is_finished()), "the copy thread ends");
        assert_eq!(fds_on(&path), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn output_fifo_reader_that_comes_late_gets_everything() {
        let (dir, path, t, mut b) = started_output("out-late");
        std::thread::sleep(Duration::from_millis(100));
        // containerd's way: a non-blocking reader.
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        assert!(within_5s(|| fds_on(&path) == 2), "the copy opens the FIFO");
        b.write_all(b"late").unwrap();
        drop(b);
        assert!(within_5s(|| t.is_finished()), "the copy thread ends");
        let mut got = String::new();
        reader.read_to_string(&mut got).unwrap();
        assert_eq!(got, "early late");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
