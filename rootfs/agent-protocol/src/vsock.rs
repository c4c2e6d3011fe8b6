//! Client side of the hybrid vsock (Firecracker's model, served by `podvisor boot --vsock`
//! and the shim's VMM): the host reaches guest port P by connecting to the VM's Unix socket,
//! writing `CONNECT P\n` and reading `OK <hostport>\n`; from then on the Unix socket is the
//! stream.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest `OK <hostport>\n` line accepted.
const MAX_REPLY: usize = 64;
/// First and last pause between attempts.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// One attempt: connect to `uds`, ask for guest `port`, wait up to `timeout` for `OK`.
pub fn connect_hybrid_vsock_once(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds)?;
    stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: nothing after the newline belongs to this handshake.
    let mut reply = Vec::new();
    let mut byte = [0u8];
    while reply.last() != Some(&b'\n') {
        if reply.len() >= MAX_REPLY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "hybrid vsock: reply line too long",
            ));
        }
        match stream.read(&mut byte)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "hybrid vsock: nothing listens on guest port {port} (connection closed)"
                    ),
                ))
            }
            _ => reply.push(byte[0]),
        }
    }
    if !reply.starts_with(b"OK ") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "hybrid vsock: CONNECT {port} answered {:?}",
                String::from_utf8_lossy(&reply)
            ),
        ));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// Connects to guest vsock `port` through the VM's hybrid vsock socket `uds`, retrying with
/// backoff (the socket not there yet, nothing listening in the guest yet) until `timeout`.
/// Returns the connected stream, or the last attempt's error.
pub fn connect_hybrid_vsock(uds: &Path, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let err = match connect_hybrid_vsock_once(uds, port, remaining) {
            Ok(stream) => return Ok(stream),
            Err(err) => err,
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(err);
        }
        std::thread::sleep(backoff.min(remaining));
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    #[test]
    fn retries_until_the_port_listens_then_hands_over_the_stream() {
        let dir = std::env::temp_dir().join(format!("pv-hvsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let server_uds = uds.clone();
        let server = std::thread::spawn(move || {
            // Not there at first; then one refusal (closed without OK), then OK + data.
            std::thread::sleep(Duration::from_millis(50));
            let listener = UnixListener::bind(&server_uds).unwrap();
            for attempt in 0..2 {
                let (conn, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&conn).read_line(&mut line).unwrap();
                assert_eq!(line, "CONNECT 1024\n");
                if attempt == 1 {
                    (&conn).write_all(b"OK 1073741824\nhello").unwrap();
                }
            }
        });
        let mut stream = connect_hybrid_vsock(&uds, 1024, Duration::from_secs(10)).unwrap();
        let mut rest = String::new();
        stream.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "hello");
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gives_up_at_the_deadline() {
        let uds = std::env::temp_dir().join(format!("pv-hvsock-none-{}", std::process::id()));
        let start = Instant::now();
        assert!(connect_hybrid_vsock(&uds, 1024, Duration::from_millis(100)).is_err());
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
