//! The Unix-socket back end: it multiplexes guest vsock streams onto host Unix sockets, the
//! hybrid model Firecracker introduced.
//!
//! * Host → guest: a host process connects to the VM's socket (`uds_path`) and writes
//!   `CONNECT <port>\n`. The device sends the guest a REQUEST to `<port>` from a fresh host
//!   port in `[2^30, 2^31)`; on the guest's RESPONSE it writes `OK <host port>\n` to the
//!   client, and from then on the socket carries the stream's bytes. No listener in the guest
//!   (RST) or no answer within the request timeout: the client is closed.
//! * Guest → host: a guest connect to CID 2 port `P` connects to `<uds_path>_P`; if nobody
//!   listens there the guest gets RST.
//!
//! The muxer owns the listening socket, the host clients still sending their `CONNECT` line,
//! and the [`Connection`]s keyed by (host port, guest port). It decides who gets the next
//! guest receive buffer (reset packets first, then connections round-robin, so one busy or
//! stalled stream cannot starve the others) and which host fds the event loop polls for
//! what. Fds are (de)registered only in [`Muxer::sync`], which the queue handler calls with
//! the event loop's `EventOps` at the end of every event: a closed connection's socket is
//! kept open until it is off the epoll set, so a stale event can never reach a reused fd.
//!
//! Timers (request, shutdown and `CONNECT`-line timeouts) are deadlines in a heap; the
//! handler arms one timerfd for the earliest.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use event_manager::EventSet;
use log::{debug, info, warn};
use vm_memory::VolatileSlice;

use super::connection::{ConnKey, Connection, Fill, Verdict};
use super::packet::{op, Header, HOST_CID, TYPE_STREAM};
use super::{uds, Timeouts, MAX_CONNECTIONS, MAX_PENDING_RST};

/// Longest `CONNECT <port>\n` line accepted.
pub const CONNECT_LINE_MAX: usize = 32;
/// First host port given to host-initiated streams (they count up in `[2^30, 2^31)`).
pub const LOCAL_PORT_FIRST: u32 = 1 << 30;
/// Connections accepted per listener wake-up before yielding to other events.
const ACCEPT_BUDGET: usize = 64;

/// Why a `CONNECT` line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectLineError {
    #[error("not UTF-8")]
    NotUtf8,
    #[error("expected `CONNECT <port>`")]
    Syntax,
    #[error("bad port number {0:?} (0..=4294967295)")]
    Port(String),
}

/// Parses `CONNECT <port>\n` (the command word in any case, `\r\n` accepted).
pub fn parse_connect_line(line: &[u8]) -> Result<u32, ConnectLineError> {
    let s = std::str::from_utf8(line).map_err(|_| ConnectLineError::NotUtf8)?;
    let mut words = s.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(cmd), Some(port), None) if cmd.eq_ignore_ascii_case("connect") => port
            .parse::<u32>()
            .map_err(|_| ConnectLineError::Port(port.into())),
        _ => Err(ConnectLineError::Syntax),
    }
}

/// Where the muxer's fds are watched (the event loop's `EventOps`, or a test double).
pub trait FdRegistry {
    fn add(&mut self, fd: RawFd, set: EventSet) -> Result<(), String>;
    fn modify(&mut self, fd: RawFd, set: EventSet) -> Result<(), String>;
    fn remove(&mut self, fd: RawFd) -> Result<(), String>;
}

/// A host client that has not finished its `CONNECT` line.
#[derive(Debug)]
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Deadline {
    Conn(ConnKey),
    Client(RawFd),
}

/// The vsock back end's state (see the module docs).
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// The listener is not polled (accept failed for lack of fds or memory) until a
    /// connection closes.
    listener_paused: bool,
    timeouts: Timeouts,
    clients: HashMap<RawFd, PendingClient>,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    /// Connections with something for the guest, in turn.
    rxq: VecDeque<ConnKey>,
    /// RST packets owed to the guest.
    rsts: VecDeque<ConnKey>,
    deadlines: BinaryHeap<Reverse<(Instant, Deadline)>>,
    /// What each fd is registered for on the event loop.
    registered: HashMap<RawFd, EventSet>,
    /// Fds whose registration may have to change.
    dirty: Vec<RawFd>,
    /// Closed sockets waiting to leave the epoll set before they are dropped.
    graveyard: Vec<UnixStream>,
}

impl Muxer {
    /// A back end for guest `guest_cid` around the bound, non-blocking `listener` at
    /// `uds_path`.
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        listener: UnixListener,
        timeouts: Timeouts,
    ) -> Self {
        let lfd = listener.as_raw_fd();
        Self {
            guest_cid,
            uds_path: uds_path.into(),
            listener,
            listener_paused: false,
            timeouts,
            clients: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            local_ports: HashSet::new(),
            next_local_port: LOCAL_PORT_FIRST,
            rxq: VecDeque::new(),
            rsts: VecDeque::new(),
            deadlines: BinaryHeap::new(),
            registered: HashMap::new(),
            dirty: vec![lfd],
            graveyard: Vec::new(),
        }
    }

    /// Live streams (established or being set up).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Host clients still sending their `CONNECT` line.
    pub fn pending_client_count(&self) -> usize {
        self.clients.len()
    }

    /// Whether the guest is owed a packet.
    pub fn has_pending_rx(&self) -> bool {
        !self.rsts.is_empty() || !self.rxq.is_empty()
    }

    /// Forgets every stream the guest knew about (device reset: the guest forgot them
    /// too). Host clients whose REQUEST was not sent yet, and those still sending their
    /// `CONNECT` line, are kept: they are served once the driver is back (Linux resets the
    /// device when it probes it, so clients may connect before the guest is up).
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        let mut closed = 0;
        for key in keys {
            if !self.conns[&key].is_unannounced() {
                self.remove(key);
                closed += 1;
            }
        }
        self.rxq.retain(|k| self.conns.contains_key(k));
        self.rsts.clear();
        if closed > 0 {
            info!("virtio-vsock: device reset closed {closed} stream(s)");
        }
    }

    // ---- host side -------------------------------------------------------------------

    /// Handles an event on one of the muxer's fds; `false` if the fd is not the muxer's.
    pub fn handle_event(&mut self, fd: RawFd, set: EventSet) -> bool {
        if fd == self.listener.as_raw_fd() {
            self.accept_clients();
        } else if self.clients.contains_key(&fd) {
            self.read_connect_line(fd);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            if let Some(conn) = self.conns.get_mut(&key) {
                let v = conn.on_host_event(set);
                self.settle(key, v);
            }
        } else {
            return false;
        }
        true
    }

    fn accept_clients(&mut self) {
        for _ in 0..ACCEPT_BUDGET {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.clients.len() >= MAX_CONNECTIONS {
                        warn!(
                            "virtio-vsock: {MAX_CONNECTIONS} streams open; refusing a host client on {:?}",
                            self.uds_path
                        );
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!("virtio-vsock: cannot make a host client socket non-blocking: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    let deadline = Instant::now() + self.timeouts.connect_line;
                    self.clients.insert(
                        fd,
                        PendingClient {
                            stream,
                            line: Vec::new(),
                            deadline,
                        },
                    );
                    self.deadlines
                        .push(Reverse((deadline, Deadline::Client(fd))));
                    self.dirty.push(fd);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of fds or memory: stop polling (the listener would stay readable
                    // and spin the loop) until a stream closes.
                    warn!(
                        "virtio-vsock: cannot accept host clients on {:?}: {e}; pausing until a stream closes",
                        self.uds_path
                    );
                    self.listener_paused = true;
                    self.dirty.push(self.listener.as_raw_fd());
                    return;
                }
            }
        }
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(client) = self.clients.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; CONNECT_LINE_MAX];
        let room = CONNECT_LINE_MAX - client.line.len();
        let n = match uds::peek(&client.stream, &mut buf[..room]) {
            Ok(0) => {
                debug!("virtio-vsock: host client left before its CONNECT line");
                self.close_client(fd);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                info!("virtio-vsock: host client socket failed: {e}");
                self.close_client(fd);
                return;
            }
        };
        // Consume the line and nothing after it: what follows belongs to the stream.
        let take = buf[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |i| i + 1);
        let got = match (&client.stream).read(&mut buf[..take]) {
            Ok(got) => got,
            Err(e) => {
                info!("virtio-vsock: host client socket failed: {e}");
                self.close_client(fd);
                return;
            }
        };
        client.line.extend_from_slice(&buf[..got]);
        if client.line.last() != Some(&b'\n') {
            if client.line.len() >= CONNECT_LINE_MAX {
                warn!(
                    "virtio-vsock: host client sent {CONNECT_LINE_MAX} bytes without a newline; expected `CONNECT <port>\\n`; closing it"
                );
                self.close_client(fd);
            }
            return;
        }
        let port = match parse_connect_line(&client.line) {
            Ok(port) => port,
            Err(e) => {
                warn!(
                    "virtio-vsock: host client sent {:?}: {e}; closing it",
                    String::from_utf8_lossy(&client.line)
                );
                self.close_client(fd);
                return;
            }
        };
        let Some(client) = self.clients.remove(&fd) else {
            return;
        };
        let local_port = self.allocate_local_port();
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        debug!("virtio-vsock: host client connecting to guest port {port} as {key}");
        let conn = Connection::new_local(client.stream, key, self.guest_cid, self.timeouts);
        self.insert(conn);
    }

    fn close_client(&mut self, fd: RawFd) {
        if let Some(c) = self.clients.remove(&fd) {
            self.graveyard.push(c.stream);
            self.resume_listener();
        }
    }

    fn allocate_local_port(&mut self) -> u32 {
        // At most MAX_CONNECTIONS ports are taken out of 2^30: this ends quickly.
        loop {
            let port = self.next_local_port;
            self.next_local_port = if port == u32::MAX >> 1 {
                LOCAL_PORT_FIRST
            } else {
                port + 1
            };
            if self.local_ports.insert(port) {
                return port;
            }
        }
    }

    fn insert(&mut self, conn: Connection) {
        let key = conn.key();
        self.by_fd.insert(conn.fd(), key);
        self.conns.insert(key, conn);
        self.settle(key, Verdict::Keep);
    }

    /// Applies a connection's verdict and refreshes its RX-queue slot, deadline and polling.
    fn settle(&mut self, key: ConnKey, verdict: Verdict) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match verdict {
            Verdict::Reset => return self.kill(key),
            Verdict::Drop => return self.remove(key),
            Verdict::Keep if conn.finished() => {
                debug!("virtio-vsock: {key}: both directions closed; resetting");
                return self.kill(key);
            }
            Verdict::Keep => {}
        }
        if conn.has_pending_rx() && !conn.in_rxq {
            conn.in_rxq = true;
            self.rxq.push_back(key);
        }
        if let Some(t) = conn.expiry() {
            if conn.scheduled != Some(t) {
                conn.scheduled = Some(t);
                self.deadlines.push(Reverse((t, Deadline::Conn(key))));
            }
        }
        self.dirty.push(conn.fd());
    }

    /// Closes the host side and owes the guest an RST.
    fn kill(&mut self, key: ConnKey) {
        self.remove(key);
        self.queue_rst(key);
    }

    fn queue_rst(&mut self, key: ConnKey) {
        if self.rsts.len() >= MAX_PENDING_RST {
            warn!(
                "virtio-vsock: {MAX_PENDING_RST} RST packets already wait for guest receive buffers; dropping the one for {key}"
            );
            return;
        }
        self.rsts.push_back(key);
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            if conn.in_rxq {
                // Keeps the RX queue no longer than the live streams, whatever the guest
                // does while it posts no receive buffers.
                self.rxq.retain(|k| *k != key);
            }
            self.by_fd.remove(&conn.fd());
            self.local_ports.remove(&key.local_port);
            self.graveyard.push(conn.into_stream());
            self.resume_listener();
        }
    }

    fn resume_listener(&mut self) {
        if self.listener_paused {
            self.listener_paused = false;
            self.dirty.push(self.listener.as_raw_fd());
        }
    }

    // ---- guest side ------------------------------------------------------------------

    /// Takes a packet the guest sent (its header and, for RW, its payload).
    pub fn send_pkt(&mut self, hdr: &Header, data: Option<&VolatileSlice<'_>>) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.src_cid != self.guest_cid {
            warn!(
                "virtio-vsock: guest packet claims source CID {} but the guest is CID {}; dropped ({hdr})",
                hdr.src_cid, self.guest_cid
            );
            return;
        }
        if hdr.dst_cid != HOST_CID {
            warn!(
                "virtio-vsock: guest packet for CID {}: only the host (CID {HOST_CID}) is reachable; dropped ({hdr})",
                hdr.dst_cid
            );
            return;
        }
        if hdr.op == op::RST {
            if self.conns.contains_key(&key) {
                debug!("virtio-vsock: {key}: reset by the guest");
                self.remove(key);
            }
            return;
        }
        let malformed = if hdr.type_ != TYPE_STREAM {
            Some("socket type is not STREAM (only stream sockets are supported)")
        } else if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&hdr.op) {
            Some("unknown operation")
        } else if hdr.op != op::RW && hdr.len != 0 {
            Some("payload on a control packet")
        } else {
            None
        };
        if let Some(why) = malformed {
            warn!("virtio-vsock: bad guest packet: {why}; answering RST ({hdr})");
            if self.conns.contains_key(&key) {
                self.kill(key);
            } else {
                self.queue_rst(key);
            }
            return;
        }
        match self.conns.get_mut(&key) {
            Some(conn) => {
                let v = conn.on_guest_pkt(hdr, data);
                self.settle(key, v);
            }
            None if hdr.op == op::REQUEST => self.connect_to_host(key, hdr),
            None => {
                debug!(
                    "virtio-vsock: {} for unknown stream {key}; answering RST",
                    op::name(hdr.op)
                );
                self.queue_rst(key);
            }
        }
    }

    /// A guest packet that could not be parsed; `hdr` is its header if that was readable.
    /// The stream it belonged to (its data is lost) is reset.
    pub fn bad_packet(&mut self, hdr: Option<&Header>) {
        let Some(hdr) = hdr else { return };
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID || hdr.op == op::RST {
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if self.conns.contains_key(&key) {
            self.kill(key);
        } else {
            self.queue_rst(key);
        }
    }

    fn connect_to_host(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.len() + self.clients.len() >= MAX_CONNECTIONS {
            warn!("virtio-vsock: {MAX_CONNECTIONS} streams open; refusing guest connect to host port {}", key.local_port);
            self.queue_rst(key);
            return;
        }
        let path = uds::port_path(&self.uds_path, key.local_port);
        match uds::connect(&path) {
            Ok(stream) => {
                debug!("virtio-vsock: {key}: guest connected to {path:?}");
                let conn = Connection::new_peer(stream, key, self.guest_cid, hdr, self.timeouts);
                self.insert(conn);
            }
            Err(e) => {
                info!(
                    "virtio-vsock: guest connect to host port {}: nothing accepts at {path:?} ({e}); answering RST",
                    key.local_port
                );
                self.queue_rst(key);
            }
        }
    }

    /// Fills a guest receive buffer whose payload area is `data`: returns the header to
    /// write (payload already written), or `None` if the guest is owed nothing.
    pub fn fill_rx(&mut self, data: &VolatileSlice<'_>) -> Option<Header> {
        let mut idle = Vec::new();
        let hdr = loop {
            if let Some(key) = self.rsts.pop_front() {
                break Some(self.rst_header(key));
            }
            let Some(key) = self.rxq.pop_front() else {
                break None;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if !conn.in_rxq {
                continue;
            }
            conn.in_rxq = false;
            match conn.fill_rx(data) {
                Fill::Packet(h) => {
                    self.settle(key, Verdict::Keep);
                    break Some(h);
                }
                // Not re-queued in this pass, or it could come back forever.
                Fill::Nothing => idle.push(key),
                Fill::Reset => self.kill(key),
            }
        };
        for key in idle {
            self.settle(key, Verdict::Keep);
        }
        hdr
    }

    fn rst_header(&self, key: ConnKey) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Default::default()
        }
    }

    // ---- timers and registration -----------------------------------------------------

    /// The earliest deadline (maybe of a stream already gone: waking for it is harmless).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((t, _))| *t)
    }

    /// Resets streams and closes clients whose deadline passed.
    pub fn sweep(&mut self, now: Instant) {
        while let Some(&Reverse((t, what))) = self.deadlines.peek() {
            if t > now {
                break;
            }
            self.deadlines.pop();
            match what {
                Deadline::Conn(key) => {
                    if self.conns.get(&key).is_some_and(|c| c.expired(now)) {
                        let what = if self.conns[&key].is_established() {
                            "shutdown"
                        } else {
                            "connection request"
                        };
                        info!("virtio-vsock: {key}: {what} timed out; resetting");
                        self.kill(key);
                    }
                }
                Deadline::Client(fd) => {
                    if self.clients.get(&fd).is_some_and(|c| c.deadline <= now) {
                        warn!(
                            "virtio-vsock: host client sent no `CONNECT <port>` line within {:?}; closing it",
                            self.timeouts.connect_line
                        );
                        self.close_client(fd);
                    }
                }
            }
        }
    }

    fn wanted(&self, fd: RawFd) -> Option<EventSet> {
        if fd == self.listener.as_raw_fd() {
            return (!self.listener_paused).then_some(EventSet::IN);
        }
        if self.clients.contains_key(&fd) {
            return Some(EventSet::IN);
        }
        let key = self.by_fd.get(&fd)?;
        self.conns.get(key)?.interest()
    }

    /// Brings the event loop's registrations in line with what the muxer wants, then drops
    /// closed sockets (only once they are off the epoll set).
    pub fn sync(&mut self, reg: &mut dyn FdRegistry) {
        // Registration failures kill connections, which dirties nothing new but may fill
        // the graveyard: two rounds settle it.
        for _ in 0..2 {
            for stream in std::mem::take(&mut self.graveyard) {
                let fd = stream.as_raw_fd();
                if self.registered.remove(&fd).is_some() {
                    if let Err(e) = reg.remove(fd) {
                        warn!("virtio-vsock: cannot stop polling fd {fd}: {e}");
                    }
                }
                drop(stream);
            }
            for fd in std::mem::take(&mut self.dirty) {
                let want = self.wanted(fd);
                let have = self.registered.get(&fd).copied();
                let res = match (have, want) {
                    (None, Some(set)) => reg.add(fd, set),
                    (Some(old), Some(set)) if old != set => reg.modify(fd, set),
                    (Some(_), None) => reg.remove(fd),
                    _ => continue,
                };
                match res {
                    Ok(()) => match want {
                        Some(set) => {
                            self.registered.insert(fd, set);
                        }
                        None => {
                            self.registered.remove(&fd);
                        }
                    },
                    Err(e) => {
                        warn!("virtio-vsock: cannot poll fd {fd} for {want:?}: {e}");
                        if let Some(&key) = self.by_fd.get(&fd) {
                            self.kill(key);
                        } else if self.clients.contains_key(&fd) {
                            self.close_client(fd);
                        }
                    }
                }
            }
            if self.graveyard.is_empty() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1234\n"), Ok(1234));
        assert_eq!(parse_connect_line(b"connect 52\r\n"), Ok(52));
        assert_eq!(parse_connect_line(b"Connect  4294967295\n"), Ok(u32::MAX));
        assert_eq!(
            parse_connect_line(b"CONNECT 4294967296\n"),
            Err(ConnectLineError::Port("4294967296".into()))
        );
        assert_eq!(
            parse_connect_line(b"CONNECT -1\n"),
            Err(ConnectLineError::Port("-1".into()))
        );
        for bad in [&b"CONNECT\n"[..], b"OPEN 1\n", b"CONNECT 1 2\n", b"\n"] {
            assert_eq!(parse_connect_line(bad), Err(ConnectLineError::Syntax));
        }
        assert_eq!(
            parse_connect_line(b"CONNECT \xff\n"),
            Err(ConnectLineError::NotUtf8)
        );
    }
}
