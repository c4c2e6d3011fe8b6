//! containerd's stdio FIFOs ↔ the agent's stream connections (one connection per stream,
//! raw bytes after the PVS1 header; see `agent.proto`).

use std::fs::OpenOptions;
use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

/// The stdio paths containerd gave for a process; empty = not wired.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// Only plain paths (FIFOs, files) for now: `binary://` and `file://` log URIs are not
    /// supported yet.
    pub fn check(&self) -> Result<(), String> {
        if self.terminal {
            return Err("terminal (tty) mode is not supported by podvisor yet".into());
        }
        for p in [&self.stdin, &self.stdout, &self.stderr] {
            if p.contains("://") {
                return Err(format!(
                    "stdio URI {p:?} is not supported by podvisor yet (FIFO paths only)"
                ));
            }
        }
        Ok(())
    }
}

/// Copies an output stream (agent → host) into containerd's FIFO until the agent closes
/// it. Opening the FIFO waits for containerd's reader.
pub fn copy_output(conn: UnixStream, path: String) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("stdio-out".into())
        .spawn(move || {
            let mut conn = conn;
            let result = OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut fifo| io::copy(&mut conn, &mut fifo));
            match result {
                Ok(n) => log::debug!("{path}: {n} bytes copied"),
                Err(e) => log::warn!("copying output to {path}: {e}"),
            }
        })
        .expect("spawn a stdio thread")
}

/// Copies containerd's stdin FIFO into the agent's stdin stream; at EOF half-closes the
/// stream, which closes the process's stdin.
pub fn copy_input(path: String, conn: UnixStream) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("stdio-in".into())
        .spawn(move || {
            let mut conn = conn;
            let result = OpenOptions::new()
                .read(true)
                .open(&path)
                .and_then(|mut fifo| io::copy(&mut fifo, &mut conn));
            if let Err(e) = result {
                log::debug!("copying stdin from {path}: {e}");
            }
            let _ = conn.shutdown(Shutdown::Write);
        })
        .expect("spawn a stdio thread")
}
