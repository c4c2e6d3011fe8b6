//! A process's stdio: containerd's side (FIFOs, `file://` and `binary://` log URIs) ↔ the
//! agent's stream connections (one connection per stream, raw bytes after the PVS1 header;
//! see `agent.proto`), copied by one thread per stream.
//!
//! - FIFO paths: stdout/stderr are opened for writing (which waits for containerd's reader),
//!   stdin for reading; stdin EOF half-closes the agent stream, which closes the process's
//!   stdin.
//! - `file:///path`: stdout and stderr appended to one host file.
//! - `binary:///path?arg=value`: a logging program started by the shim, as containerd's runc
//!   shim does: fd 3 = stdout, fd 4 = stderr, fd 5 closed by the program once it is ready;
//!   `CONTAINER_ID` and `CONTAINER_NAMESPACE` in its environment.
//! - terminal: one `pty` stream carries both directions; stdout receives the terminal output.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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

/// One output destination: a path opened (and waited for) by the copy thread, or an open
/// file shared by stdout and stderr.
#[derive(Clone)]
pub enum Writer {
    Path(String),
    Shared(Arc<File>),
}

impl Writer {
    fn open(&self) -> io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            Writer::Path(p) => Box::new(OpenOptions::new().write(true).open(p)?),
            Writer::Shared(f) => Box::new(SharedFile(f.clone())),
        })
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
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        let _ = tx.send(ready.read(&mut b));
    });
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

/// Copies an output stream (agent → host) until the agent closes it.
pub fn copy_output(conn: UnixStream, to: Writer) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("stdio-out".into())
        .spawn(move || {
            let mut conn = conn;
            let result = to.open().and_then(|mut w| {
                let n = io::copy(&mut conn, &mut w)?;
                w.flush()?;
                Ok(n)
            });
            match result {
                Ok(n) => log::debug!("output: {n} bytes copied"),
                Err(e) => log::warn!("copying output: {e}"),
            }
        })
        .expect("spawn a stdio thread")
}

/// The stdin copy of a process: how many bytes went to the agent, and whether it ended.
#[derive(Clone, Default, Debug)]
pub struct StdinState {
    bytes: Arc<AtomicU64>,
    done: Arc<(Mutex<bool>, Condvar)>,
}

impl StdinState {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for the copy to reach EOF; whether it did.
    pub fn wait_done(&self, timeout: Duration) -> bool {
        let (lock, cv) = &*self.done;
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |done| !*done)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

/// Copies containerd's stdin (a FIFO) into the agent's stdin (or pty) stream; at EOF
/// half-closes the stream, which closes the process's stdin.
pub fn copy_input(path: String, conn: UnixStream) -> StdinState {
    let state = StdinState::default();
    let st = state.clone();
    std::thread::Builder::new()
        .name("stdio-in".into())
        .spawn(move || {
            let mut conn = conn;
            let result = OpenOptions::new()
                .read(true)
                .open(&path)
                .and_then(|mut fifo| {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = fifo.read(&mut buf)?;
                        if n == 0 {
                            return Ok(());
                        }
                        conn.write_all(&buf[..n])?;
                        st.bytes.fetch_add(n as u64, Ordering::SeqCst);
                    }
                });
            if let Err(e) = result {
                log::debug!("copying stdin from {path}: {e}");
            }
            let _ = conn.shutdown(Shutdown::Write);
            let (lock, cv) = &*st.done;
            *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
            cv.notify_all();
        })
        .expect("spawn a stdio thread");
    state
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
            copy_output(a, writer).join().unwrap();
        }
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "out\nerr\n");
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
            copy_output(a, writer).join().unwrap();
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
        let st = copy_input(file.to_string_lossy().into_owned(), a);
        let mut got = String::new();
        b.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello");
        assert!(st.wait_done(Duration::from_secs(5)));
        assert_eq!(st.bytes(), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
