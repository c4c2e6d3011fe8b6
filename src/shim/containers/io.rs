//! A process's stdio between containerd's side (`super::super::stdio`) and the agent's
//! stream connections: attach the streams the process asks for, then start the copies.

use std::os::unix::net::UnixStream;

use crate::agent::{Agent, StdioFlags, StreamKind};
use crate::error::ShimError;
use crate::stdio::{copy_input, copy_output, FirstBytes, StdioPaths};

use super::process::ProcessIo;

/// The agent streams of one process, attached before the process is created.
#[derive(Default)]
pub struct Streams {
    stdin: Option<UnixStream>,
    stdout: Option<UnixStream>,
    stderr: Option<UnixStream>,
    pty: Option<UnixStream>,
}

/// Attaches the streams `stdio` asks for; returns them with the agent's flags.
pub fn attach(
    agent: &dyn Agent,
    id: &str,
    exec_id: &str,
    stdio: &StdioPaths,
) -> Result<(Streams, StdioFlags), ShimError> {
    let attach = |kind| agent.attach_stream(kind, id, exec_id);
    let mut s = Streams::default();
    if stdio.terminal {
        s.pty = Some(attach(StreamKind::Pty)?);
        let flags = StdioFlags {
            terminal: true,
            ..Default::default()
        };
        return Ok((s, flags));
    }
    if !stdio.stdin.is_empty() {
        s.stdin = Some(attach(StreamKind::Stdin)?);
    }
    if !stdio.stdout.is_empty() {
        s.stdout = Some(attach(StreamKind::Stdout)?);
    }
    if !stdio.stderr.is_empty() {
        s.stderr = Some(attach(StreamKind::Stderr)?);
    }
    let flags = StdioFlags {
        stdin: s.stdin.is_some(),
        stdout: s.stdout.is_some(),
        stderr: s.stderr.is_some(),
        terminal: false,
    };
    Ok((s, flags))
}

fn no_thread(source: std::io::Error) -> ShimError {
    ShimError::Thread {
        what: "stdio copy",
        source,
    }
}

/// Starts the copies of a process whose streams the agent took; what they hold goes to `io`.
/// `first_output`, if any, runs when the process's stdout (or its terminal) first carries
/// bytes.
pub fn wire(
    id: &str,
    namespace: &str,
    stdio: &StdioPaths,
    streams: Streams,
    io: &mut ProcessIo,
    first_output: Option<FirstBytes>,
) -> Result<(), ShimError> {
    let w = stdio
        .output_writers(id, namespace)
        .map_err(ShimError::Stdio)?;
    io.logger = w.logger;
    if let Some(pty) = streams.pty {
        let input = pty
            .try_clone()
            .map_err(|e| ShimError::Stdio(format!("clone the pty stream: {e}")))?;
        if let Some(out) = w.stdout {
            io.outputs
                .push(copy_output(pty, out, first_output).map_err(no_thread)?);
        }
        if !stdio.stdin.is_empty() {
            io.stdin = Some(copy_input(stdio.stdin.clone(), input).map_err(no_thread)?);
        }
        return Ok(());
    }
    if let (Some(conn), Some(out)) = (streams.stdout, w.stdout) {
        io.outputs
            .push(copy_output(conn, out, first_output).map_err(no_thread)?);
    }
    if let (Some(conn), Some(out)) = (streams.stderr, w.stderr) {
        io.outputs
            .push(copy_output(conn, out, None).map_err(no_thread)?);
    }
    if let Some(conn) = streams.stdin {
        io.stdin = Some(copy_input(stdio.stdin.clone(), conn).map_err(no_thread)?);
    }
    Ok(())
}
