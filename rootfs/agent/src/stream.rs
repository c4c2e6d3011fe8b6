//! Stdio streams: the stream listener, the registry of attached-but-unclaimed connections,
//! and the pumps that copy between a connection and a process's pipe or pty.
//!
//! Protocol (also in the header comment of `proto/agent.proto`): the client connects, sends
//! a [`StreamHeader`] naming (container id, exec id, kind), the agent answers one [`Ack`]
//! byte; later CreateContainer/ExecProcess claims the connections of that process.
//!
//! One thread per pump, each with a small stack: output pumps read a pipe (or the pty
//! master) and write the connection until EOF, then half-close it and tell the process
//! (which is how WaitProcess knows the output is drained); the stdin pump copies the other
//! way, counting bytes for CloseStdin.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::socket::{setsockopt, shutdown, sockopt, Shutdown};
use nix::sys::time::TimeVal;
use podvisor_agent_protocol::stream::{Ack, StreamError, StreamHeader, StreamKind};

use crate::listener::{self, ListenAddr};
use crate::process::Process;
use crate::stdin_control::StdinControl;

/// Stack size of pump and acceptor threads: they only copy through a heap buffer.
const PUMP_STACK: usize = 64 * 1024;
/// Copy buffer size.
const BUF_SIZE: usize = 32 * 1024;
/// How long a client may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Spawns a named thread with a small stack.
pub fn spawn_small<F: FnOnce() + Send + 'static>(name: String, f: F) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name)
        .stack_size(PUMP_STACK)
        .spawn(f)
        .map(drop)
}

/// The connections attached for one process and not yet claimed.
#[derive(Default)]
pub struct Attached {
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    pub pty: Option<File>,
}

impl Attached {
    fn slot(&mut self, kind: StreamKind) -> &mut Option<File> {
        match kind {
            StreamKind::Stdin => &mut self.stdin,
            StreamKind::Stdout => &mut self.stdout,
            StreamKind::Stderr => &mut self.stderr,
            StreamKind::Pty => &mut self.pty,
        }
    }
}

type ProcessKey = (String, String);

/// Registry of attached stream connections, keyed by (container id, exec id).
#[derive(Default)]
pub struct Streams {
    pending: Mutex<HashMap<ProcessKey, Attached>>,
}

impl Streams {
    fn pending(&self) -> MutexGuard<'_, HashMap<ProcessKey, Attached>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Files a connection under its header; refuses a second one of the same kind.
    pub fn attach(&self, header: &StreamHeader, conn: File) -> Ack {
        let mut pending = self.pending();
        let key = (header.container_id.clone(), header.exec_id.clone());
        let slot = pending.entry(key).or_default().slot(header.kind);
        if slot.is_some() {
            return Ack::Duplicate;
        }
        *slot = Some(conn);
        Ack::Attached
    }

    /// Claims the connections of a process (empty if none were attached).
    pub fn take(&self, container_id: &str, exec_id: &str) -> Attached {
        self.pending()
            .remove(&(container_id.to_string(), exec_id.to_string()))
            .unwrap_or_default()
    }

    /// Closes unclaimed connections of a container (removal).
    pub fn forget_container(&self, container_id: &str) {
        self.pending().retain(|(cid, _), _| cid != container_id);
    }

    /// Closes every unclaimed connection (sandbox destruction).
    pub fn forget_all(&self) {
        self.pending().clear();
    }

    fn handshake(&self, conn: OwnedFd) -> Result<(), StreamError> {
        let secs = i64::try_from(HEADER_TIMEOUT.as_secs()).expect("a few seconds");
        let timeout = TimeVal::new(secs, 0);
        setsockopt(&conn, sockopt::ReceiveTimeout, &timeout).map_err(io::Error::from)?;
        let mut conn = File::from(conn);
        let header = match StreamHeader::read_from(&mut conn) {
            Ok(header) => header,
            Err(err) => {
                let _ = conn.write_all(&[Ack::Malformed as u8]);
                return Err(err);
            }
        };
        setsockopt(&conn.as_fd(), sockopt::ReceiveTimeout, &TimeVal::new(0, 0))
            .map_err(io::Error::from)?;
        // File first, then answer: the client calls Create/Exec only after the answer, so
        // nothing claims the connection before the ack byte is written.
        let ack = self.attach(&header, conn.try_clone()?);
        conn.write_all(&[ack as u8])?;
        if ack != Ack::Attached {
            return Err(StreamError::Refused(ack));
        }
        log::debug!(
            "stream {:?} attached for {}/{}",
            header.kind,
            header.container_id,
            header.exec_id
        );
        Ok(())
    }

    /// Accepts stream connections on `listener` in a thread, for the agent's lifetime.
    pub fn serve(self: &Arc<Self>, listener: OwnedFd, addr: ListenAddr) -> io::Result<()> {
        let streams = self.clone();
        spawn_small("stream-accept".into(), move || loop {
            match listener::accept(&listener, &addr) {
                Ok(conn) => {
                    if let Err(err) = streams.handshake(conn) {
                        log::warn!("stream connection refused: {err}");
                    }
                }
                Err(err) => {
                    log::error!("{err}");
                    // Out of fds or similar: do not spin.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    }
}

/// Starts a pump from the client connection `conn` into `sink` (the stdin pipe's write end
/// or the pty master); returns its control. Dropping `sink` at the end is the EOF.
pub fn start_input_pump(
    process: &Arc<Process>,
    conn: File,
    sink: File,
) -> io::Result<Arc<StdinControl>> {
    let control = Arc::new(StdinControl::new(OwnedFd::from(conn.try_clone()?)));
    let pump_control = control.clone();
    let name = process.name();
    spawn_small(format!("stdin-{}", process.container_id), move || {
        pump_input(conn, sink, &pump_control, &name)
    })?;
    Ok(control)
}

fn pump_input(mut conn: File, mut sink: File, control: &StdinControl, name: &str) {
    let mut buf = vec![0u8; BUF_SIZE];
    while !control.should_stop() {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::debug!("stdin of {name}: reading the stream failed: {e}");
                break;
            }
        };
        if let Err(e) = sink.write_all(&buf[..n]) {
            // EPIPE: the process closed its stdin. Nothing more can be delivered.
            log::debug!("stdin of {name}: writing to the process failed: {e}");
            break;
        }
        if !control.forwarded(n) {
            break;
        }
    }
    log::debug!("stdin of {name} closed");
}

/// Starts a pump from `source` (a stdout/stderr pipe's read end or the pty master) to the
/// client connection `conn`. The process counts it as an open output until it is done.
pub fn start_output_pump(
    process: &Arc<Process>,
    kind: &str,
    source: File,
    conn: File,
) -> io::Result<()> {
    process.add_output();
    let pump_process = process.clone();
    let kind_name = kind.to_string();
    let started = spawn_small(format!("{kind}-{}", process.container_id), move || {
        pump_output(source, conn, &pump_process.name(), &kind_name);
        pump_process.output_done();
    });
    if started.is_err() {
        process.output_done();
    }
    started
}

fn pump_output(mut source: File, mut conn: File, name: &str, kind: &str) {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut client_gone = false;
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A pty master reads EIO once every slave fd is closed: that is its EOF.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => {
                log::warn!("{kind} of {name}: read failed: {e}");
                break;
            }
        };
        // Keep draining after the client went away so the process never blocks on a full
        // pipe.
        if !client_gone {
            if let Err(e) = conn.write_all(&buf[..n]) {
                log::info!("{kind} of {name}: client stream closed ({e}); discarding output");
                client_gone = true;
            }
        }
    }
    let _ = shutdown(std::os::fd::AsRawFd::as_raw_fd(&conn), Shutdown::Write);
    log::debug!("{kind} of {name} drained");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair() -> (File, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (File::from(OwnedFd::from(a)), b)
    }

    #[test]
    fn refuses_duplicate_kind() {
        let streams = Streams::default();
        let header = StreamHeader::new(StreamKind::Stdout, "c", "");
        assert_eq!(streams.attach(&header, pair().0), Ack::Attached);
        assert_eq!(streams.attach(&header, pair().0), Ack::Duplicate);
        let attached = streams.take("c", "");
        assert!(attached.stdout.is_some() && attached.stdin.is_none());
        assert!(streams.take("c", "").stdout.is_none());
    }

    #[test]
    fn output_pump_drains_then_half_closes() {
        let process = Process::new("c", "");
        let (conn, mut client) = pair();
        let (reader, mut writer) = std::io::pipe().unwrap();
        start_output_pump(&process, "stdout", File::from(OwnedFd::from(reader)), conn).unwrap();
        writer.write_all(b"hello").unwrap();
        drop(writer);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello");
        process.set_exited(0);
        assert_eq!(process.wait().status, 0);
    }

    #[test]
    fn close_stdin_after_byte_count() {
        let process = Process::new("c", "");
        let (conn, mut client) = pair();
        let (mut reader, writer) = std::io::pipe().unwrap();
        let control = start_input_pump(&process, conn, File::from(OwnedFd::from(writer))).unwrap();
        client.write_all(b"abc").unwrap();
        control.close_after(3);
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"abc");
    }
}
