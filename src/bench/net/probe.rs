//! The measuring client: plain TCP from the host against the three servers a bench pod
//! runs (busybox `nc -ll … -e`, [`POD_SERVERS`]): an echo server for request/response and
//! connect latency, a sink for peer → pod throughput and a source for pod → peer. Every
//! call has timeouts, so a stalled or dead guest ends a probe with an error instead of a
//! hang. The functions run in the calling thread: the bench calls them inside the peer
//! network namespace (`Netns::run`).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Port of the pod's echo server (`cat`).
pub const ECHO_PORT: u16 = 5001;
/// Port of the pod's sink (`dd of=/dev/null`).
pub const SINK_PORT: u16 = 5002;
/// Port of the pod's source (`dd if=/dev/zero`).
pub const SOURCE_PORT: u16 = 5003;

/// The bench pod's command: the three servers, then idle. busybox `nc -ll -e` forks the
/// program per connection with the connection on its stdin/stdout.
pub const POD_SERVERS: &str = "nc -ll -p 5001 -e cat & \
     nc -ll -p 5002 -e dd of=/dev/null bs=65536 & \
     nc -ll -p 5003 -e dd if=/dev/zero bs=65536 & \
     exec sleep 100000";

/// A step's socket timeout: longer than any stall of an emulated guest kernel.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
const CHUNK: usize = 64 * 1024;

/// Errors of one probe, naming the step and the address.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{step} {addr}: {source}")]
    Io {
        step: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{addr} did not accept a connection within {secs} s (last error: {last})")]
    NotReady {
        addr: SocketAddr,
        secs: u64,
        last: String,
    },
    #[error("echo from {addr} returned {got:?} for {sent:?}: the stream is corrupted")]
    BadEcho { addr: SocketAddr, sent: u8, got: u8 },
    #[error("interrupted")]
    Interrupted,
}

fn io(step: &'static str, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> ProbeError {
    move |source| ProbeError::Io { step, addr, source }
}

/// A connection to `addr` with [`IO_TIMEOUT`] on reads and writes and Nagle off.
pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProbeError> {
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(io("connect to", addr))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| s.set_nodelay(true))
        .map_err(io("set options on", addr))?;
    Ok(s)
}

/// Waits until `addr` accepts a connection (a booting guest drops or refuses them) and
/// its echo server answers; returns how long that took.
pub fn wait_ready(
    addr: SocketAddr,
    timeout: Duration,
    interrupted: impl Fn() -> bool,
) -> Result<Duration, ProbeError> {
    let start = Instant::now();
    let mut last = String::from("none");
    while start.elapsed() < timeout {
        if interrupted() {
            return Err(ProbeError::Interrupted);
        }
        match connect(addr, Duration::from_secs(2)).and_then(|mut s| round_trip(&mut s, addr, 0)) {
            Ok(_) => return Ok(start.elapsed()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(ProbeError::NotReady {
        addr,
        secs: timeout.as_secs(),
        last,
    })
}

/// One byte to the echo server and back; returns the round trip.
/// A round's number as the one byte it sends: the low byte, wrapping every 256 rounds.
fn seq_byte(round: usize) -> u8 {
    round.to_le_bytes()[0]
}

fn round_trip(s: &mut TcpStream, addr: SocketAddr, seq: u8) -> Result<Duration, ProbeError> {
    let t = Instant::now();
    s.write_all(&[seq]).map_err(io("write to", addr))?;
    let mut b = [0u8];
    s.read_exact(&mut b).map_err(io("read echo from", addr))?;
    if b[0] != seq {
        return Err(ProbeError::BadEcho {
            addr,
            sent: seq,
            got: b[0],
        });
    }
    Ok(t.elapsed())
}

/// `count` fresh connections to the echo server at `addr`, one after the other, each
/// timed twice: the connect (the TCP handshake, answered by the guest kernel) and the
/// connect plus a one-byte echo (netperf's TCP_CRR: the server accepted and started its
/// program). Waiting for the echo also paces the probe to the server's accept rate, so
/// that the connects do not overflow a small listen backlog (busybox `nc` listens with a
/// backlog of 2). Returns (connect ms, connect + echo ms) per connection.
pub fn connect_times(addr: SocketAddr, count: usize) -> Result<Vec<(f64, f64)>, ProbeError> {
    (0..count)
        .map(|i| {
            let t = Instant::now();
            let mut s = connect(addr, IO_TIMEOUT)?;
            let connected = t.elapsed().as_secs_f64() * 1e3;
            round_trip(&mut s, addr, seq_byte(i))?;
            let echoed = t.elapsed().as_secs_f64() * 1e3;
            let _ = s.shutdown(Shutdown::Both);
            Ok((connected, echoed))
        })
        .collect()
}

/// One-byte request/response on one connection to the echo server for `duration` (after
/// 5 warm-up rounds) or `max` rounds, whichever comes first: each round trip, µs.
pub fn request_response(
    addr: SocketAddr,
    duration: Duration,
    max: usize,
) -> Result<Vec<f64>, ProbeError> {
    let mut s = connect(addr, IO_TIMEOUT)?;
    for i in 0..5u8 {
        round_trip(&mut s, addr, i)?;
    }
    let start = Instant::now();
    let mut rtts = Vec::new();
    while rtts.len() < max && start.elapsed() < duration {
        let rtt = round_trip(&mut s, addr, seq_byte(rtts.len()))?;
        rtts.push(rtt.as_secs_f64() * 1e6);
    }
    Ok(rtts)
}

/// Bytes moved in an elapsed time.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Throughput {
    pub bytes: u64,
    pub secs: f64,
}

impl Throughput {
    pub fn mbit_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 * 8.0 / self.secs / 1e6
        } else {
            0.0
        }
    }
}

/// Writes zeros to the sink at `addr` for `duration`, then closes the sending side and
/// waits for the sink to close (it has read everything): bytes over the time to that EOF.
pub fn stream_to(addr: SocketAddr, duration: Duration) -> Result<Throughput, ProbeError> {
    let mut s = connect(addr, IO_TIMEOUT)?;
    let buf = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < duration {
        let n = s.write(&buf).map_err(io("write to", addr))?;
        bytes += n as u64;
    }
    s.shutdown(Shutdown::Write)
        .map_err(io("close the sending side to", addr))?;
    let mut rest = [0u8; 64];
    loop {
        match s.read(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // A reset (the sink closed with data unread) is a failure, not the end.
            Err(e) => return Err(io("wait for the sink to finish at", addr)(e)),
        }
    }
    Ok(Throughput {
        bytes,
        secs: start.elapsed().as_secs_f64(),
    })
}

/// Reads from the source at `addr` for `duration`: bytes over that time.
pub fn stream_from(addr: SocketAddr, duration: Duration) -> Result<Throughput, ProbeError> {
    let mut s = connect(addr, IO_TIMEOUT)?;
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < duration {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io("read from", addr)(e)),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = s.shutdown(Shutdown::Both);
    if bytes == 0 {
        return Err(ProbeError::Io {
            step: "read from",
            addr,
            source: std::io::Error::other(format!(
                "the source closed the connection without sending anything in {secs:.1} s"
            )),
        });
    }
    Ok(Throughput { bytes, secs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// In-process stand-ins of the pod's servers on 127.0.0.1 (same protocol as
    /// [`POD_SERVERS`]); returns (echo, sink, source) addresses and the sink's byte count.
    fn servers() -> (SocketAddr, SocketAddr, SocketAddr, Arc<AtomicU64>) {
        let listen = || TcpListener::bind("127.0.0.1:0").unwrap();
        let (echo, sink, source) = (listen(), listen(), listen());
        let addrs = (
            echo.local_addr().unwrap(),
            sink.local_addr().unwrap(),
            source.local_addr().unwrap(),
        );
        std::thread::spawn(move || {
            for c in echo.incoming().map_while(Result::ok) {
                std::thread::spawn(move || {
                    let mut w = c.try_clone().unwrap();
                    let _ = std::io::copy(&mut &c, &mut w);
                });
            }
        });
        let received = Arc::new(AtomicU64::new(0));
        let r = received.clone();
        std::thread::spawn(move || {
            for mut c in sink.incoming().map_while(Result::ok) {
                let n = std::io::copy(&mut c, &mut std::io::sink()).unwrap();
                r.fetch_add(n, Ordering::SeqCst);
            }
        });
        std::thread::spawn(move || {
            for mut c in source.incoming().map_while(Result::ok) {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut std::io::repeat(0), &mut c);
                });
            }
        });
        (addrs.0, addrs.1, addrs.2, received)
    }

    #[test]
    fn probes_measure_local_servers() {
        let (echo, sink, source, received) = servers();
        let ready = wait_ready(echo, Duration::from_secs(5), || false).unwrap();
        assert!(ready < Duration::from_secs(5));
        let connects = connect_times(echo, 3).unwrap();
        assert_eq!(connects.len(), 3);
        assert!(connects.iter().all(|&(c, e)| c > 0.0 && e >= c));
        let rtts = request_response(echo, Duration::from_secs(10), 50).unwrap();
        assert_eq!(rtts.len(), 50, "stops at max rounds");
        assert!(rtts.iter().all(|&us| us > 0.0));
        let to = stream_to(sink, Duration::from_millis(200)).unwrap();
        assert!(to.bytes > 0);
        assert_eq!(
            received.load(Ordering::SeqCst),
            to.bytes,
            "the sink had everything when the stream ended"
        );
        let from = stream_from(source, Duration::from_millis(200)).unwrap();
        assert!(from.bytes > 0 && from.secs >= 0.2);
        assert!(from.mbit_per_sec() > 0.0);
    }

    #[test]
    fn a_dead_address_is_an_error_not_a_hang() {
        // A port nobody listens on: refused at once, and wait_ready gives up at its limit.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        assert!(matches!(
            stream_from(addr, Duration::from_secs(1)),
            Err(ProbeError::Io { .. })
        ));
        let err = wait_ready(addr, Duration::from_millis(500), || false).unwrap_err();
        assert!(err.to_string().contains("did not accept"), "{err}");
        assert!(matches!(
            wait_ready(addr, Duration::from_secs(5), || true),
            Err(ProbeError::Interrupted)
        ));
    }

    #[test]
    fn a_wrong_echo_is_reported() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut b = [0u8];
            while c.read_exact(&mut b).is_ok() {
                let _ = c.write_all(&[b[0].wrapping_add(1)]);
            }
        });
        let err = request_response(addr, Duration::from_secs(1), 10).unwrap_err();
        assert!(matches!(err, ProbeError::BadEcho { .. }), "{err}");
    }

    #[test]
    fn throughput_in_mbit() {
        let t = Throughput {
            bytes: 125_000_000,
            secs: 2.0,
        };
        assert_eq!(t.mbit_per_sec(), 500.0);
        assert_eq!(
            Throughput {
                bytes: 1,
                secs: 0.0
            }
            .mbit_per_sec(),
            0.0
        );
    }
}
