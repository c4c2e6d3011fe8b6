//! One stream between a guest vsock socket and a host Unix stream socket: its state machine,
//! its flow control and the data it moves. It knows nothing about queues or the event loop:
//! the [muxer](super::muxer) feeds it guest packets ([`Connection::on_guest_pkt`]), host
//! socket events ([`Connection::on_host_event`]) and guest receive buffers
//! ([`Connection::fill_rx`]), and reads back what it wants polled ([`Connection::interest`]),
//! whether it has something to say ([`Connection::has_pending_rx`]) and its kill deadline.
//!
//! ## Life of a stream
//! * Host-initiated ([`Connection::new_local`]): the device sends REQUEST and waits for the
//!   guest's RESPONSE (with the request timeout), then writes `OK <local port>\n` to the
//!   host client. A guest RST means no listener: the host client is closed.
//! * Guest-initiated ([`Connection::new_peer`]): the host socket is already connected; the
//!   device answers RESPONSE.
//! * Established: bytes flow both ways under credit-based flow control (below).
//! * Closing follows the SHUTDOWN flags of both sides. Guest `SEND` → the host peer gets EOF
//!   (`shutdown(SHUT_WR)`) once everything buffered is written; guest `RCV` → the host peer's
//!   writes fail (`shutdown(SHUT_RD)`). Host EOF → SHUTDOWN(`SEND`) to the guest; host hang-up
//!   → SHUTDOWN(`RCV`). Once no data can flow either way the stream is finished: the device
//!   sends RST and closes the host socket. If the only thing left is buffered guest data the
//!   host peer does not read, the shutdown timeout bounds the wait.
//!
//! ## Flow control (virtio 1.x §5.10.6.3)
//! * Guest → host: the device offers [`CONN_BUF_ALLOC`] bytes of credit and counts in
//!   `fwd_cnt` what reached the host socket. Bytes the socket does not take wait in a bounded
//!   `TxBuf`. A host peer that stops reading stops `fwd_cnt`, which stops the guest sender
//!   (it runs out of credit) without touching other streams. A guest that sends beyond its
//!   credit is reset. Credit updates go out once [`CREDIT_UPDATE_THRESHOLD`] bytes were
//!   forwarded since the guest last heard `fwd_cnt` (every packet carries it).
//! * Host → guest: the device never sends more than `buf_alloc - (rx_cnt - fwd_cnt)` the
//!   guest advertised. With no credit the host socket is not polled for input (its data
//!   waits in the socket buffer, and the host writer blocks); the device asks once with
//!   CREDIT_REQUEST and resumes on the guest's next credit information.

use std::cmp::min;
use std::io;
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use event_manager::EventSet;
use log::{debug, info, warn};
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

use super::packet::{op, shutdown, Header, HOST_CID, TYPE_STREAM};
use super::txbuf::TxBuf;
use super::{uds, Timeouts, CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD, MAX_PKT_DATA};

/// A stream's identity: (host port, guest port). The CIDs are fixed per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

impl std::fmt::Display for ConnKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host:{} <-> guest:{}", self.local_port, self.peer_port)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Host-initiated, waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated, RESPONSE not sent yet.
    PeerInit,
    Established,
}

/// What the muxer must do with a connection after an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Send RST to the guest and close the host socket.
    Reset,
    /// Close the host socket; the guest is not told (it never knew, or it reset).
    Drop,
}

/// What [`Connection::fill_rx`] put into a guest receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// A packet: its header (the `len` payload bytes are already in the buffer).
    Packet(Header),
    /// Nothing to send after all (the host socket had no data).
    Nothing,
    /// The host socket failed: reset the stream.
    Reset,
}

/// A vsock stream backed by a host Unix stream socket.
#[derive(Debug)]
pub struct Connection {
    key: ConnKey,
    guest_cid: u64,
    stream: UnixStream,
    phase: Phase,
    timeouts: Timeouts,
    /// LocalInit: REQUEST sent.
    request_sent: bool,
    /// Guest → host bytes the host socket has not taken yet.
    tx_buf: TxBuf,
    /// Guest bytes written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last sent to the guest.
    fwd_cnt_told: Wrapping<u32>,
    /// The guest's receive buffer size and consumed count (its credit for us).
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Host → guest bytes sent.
    rx_cnt: Wrapping<u32>,
    /// The host socket is readable (data or EOF) and we have not read it all.
    rw_pending: bool,
    credit_update_due: bool,
    credit_request_due: bool,
    /// A CREDIT_REQUEST went out and the guest's credit has not changed since.
    credit_requested: bool,
    /// The host peer will send no more (we read EOF).
    host_eof: bool,
    /// The host peer hung up (it can no longer receive).
    host_hup: bool,
    /// We shut the host socket for writing (after a guest SHUTDOWN(SEND)).
    host_write_shut: bool,
    /// SHUTDOWN flags the guest sent (accumulated).
    guest_shut: u32,
    /// SHUTDOWN flags we sent the guest (accumulated).
    told_guest: u32,
    /// When the connection is to be reset (request or shutdown timeout).
    expiry: Option<Instant>,
    /// Muxer bookkeeping: the connection is in the muxer's RX queue.
    pub(crate) in_rxq: bool,
    /// Muxer bookkeeping: the deadline the muxer's timer knows about.
    pub(crate) scheduled: Option<Instant>,
}

impl Connection {
    fn new(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        phase: Phase,
        timeouts: Timeouts,
    ) -> Self {
        Self {
            key,
            guest_cid,
            stream,
            phase,
            timeouts,
            request_sent: false,
            tx_buf: TxBuf::new(CONN_BUF_ALLOC as usize),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            rw_pending: false,
            credit_update_due: false,
            credit_request_due: false,
            credit_requested: false,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            guest_shut: 0,
            told_guest: 0,
            expiry: None,
            in_rxq: false,
            scheduled: None,
        }
    }

    /// A host-initiated stream (the host client sent `CONNECT <key.peer_port>`).
    pub fn new_local(stream: UnixStream, key: ConnKey, guest_cid: u64, t: Timeouts) -> Self {
        Self::new(stream, key, guest_cid, Phase::LocalInit, t)
    }

    /// A guest-initiated stream: `hdr` is the guest's REQUEST, `stream` the connected host
    /// socket.
    pub fn new_peer(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        hdr: &Header,
        t: Timeouts,
    ) -> Self {
        let mut c = Self::new(stream, key, guest_cid, Phase::PeerInit, t);
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c
    }

    pub fn key(&self) -> ConnKey {
        self.key
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Gives up the host socket (to be closed once it is off the event loop).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// When the connection must be reset, if it has a deadline.
    pub fn expiry(&self) -> Option<Instant> {
        self.expiry
    }

    /// Whether the deadline has passed.
    pub fn expired(&self, now: Instant) -> bool {
        self.expiry.is_some_and(|t| t <= now)
    }

    /// A host-initiated stream the guest has not heard of yet.
    pub fn is_unannounced(&self) -> bool {
        self.phase == Phase::LocalInit && !self.request_sent
    }

    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established
    }

    /// Bytes the guest can still take from us.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        // A guest claiming to have consumed more than it got has no credit.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn may_read_host(&self) -> bool {
        self.phase == Phase::Established && !self.host_eof && self.guest_shut & shutdown::RCV == 0
    }

    fn local_shut_flags(&self) -> u32 {
        let mut f = 0;
        if self.host_eof {
            f |= shutdown::SEND;
        }
        if self.host_hup {
            f |= shutdown::RCV;
        }
        f
    }

    fn shutdown_due(&self) -> u32 {
        if self.phase != Phase::Established {
            return 0;
        }
        self.local_shut_flags() & !self.told_guest
    }

    /// The epoll events the host socket should be watched for: `None` = not registered.
    /// Registered with an empty set, it still reports hang-ups and errors.
    pub fn interest(&self) -> Option<EventSet> {
        // After a hang-up the socket is level-triggered readable and hung up forever:
        // polling it would spin. What is left in it is read as the guest takes it.
        if self.host_hup {
            return None;
        }
        let mut set = EventSet::empty();
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        if self.may_read_host() && !self.rw_pending && self.peer_credit() > 0 {
            set |= EventSet::IN;
        }
        Some(set)
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_pending_rx(&self) -> bool {
        match self.phase {
            Phase::LocalInit => !self.request_sent,
            Phase::PeerInit => true,
            Phase::Established => {
                self.shutdown_due() != 0
                    || (self.rw_pending && self.may_read_host() && self.peer_credit() > 0)
                    || self.credit_request_due
                    || self.credit_update_due
            }
        }
    }

    /// No data can flow either way any more: the stream is over (reset it).
    pub fn finished(&self) -> bool {
        self.phase == Phase::Established
            && (self.host_eof || self.guest_shut & shutdown::RCV != 0)
            && ((self.guest_shut & shutdown::SEND != 0 && self.tx_buf.is_empty()) || self.host_hup)
    }

    fn header(&self, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Every packet carries our credit: the guest is up to date after it.
    fn emit(&mut self, hdr: Header) -> Fill {
        self.fwd_cnt_told = self.fwd_cnt;
        self.credit_update_due = false;
        Fill::Packet(hdr)
    }

    /// Fills a guest receive buffer (`data` is its payload area) with the next packet.
    pub fn fill_rx(&mut self, data: &VolatileSlice<'_>) -> Fill {
        match self.phase {
            Phase::LocalInit if !self.request_sent => {
                self.request_sent = true;
                self.expiry = Some(Instant::now() + self.timeouts.request);
                return self.emit(self.header(op::REQUEST));
            }
            Phase::LocalInit => return Fill::Nothing,
            Phase::PeerInit => {
                self.phase = Phase::Established;
                return self.emit(self.header(op::RESPONSE));
            }
            Phase::Established => {}
        }
        if self.shutdown_due() != 0 {
            return self.emit_shutdown();
        }
        if self.rw_pending && self.may_read_host() && self.peer_credit() > 0 {
            let max = min(
                min(data.len(), MAX_PKT_DATA as usize),
                self.peer_credit() as usize,
            );
            if max > 0 {
                // In range: max <= data.len().
                let mut dst = match data.subslice(0, max) {
                    Ok(d) => d,
                    Err(e) => {
                        warn!("virtio-vsock: {}: bad receive buffer: {e}", self.key);
                        return Fill::Nothing;
                    }
                };
                match (&self.stream).read_volatile(&mut dst) {
                    Ok(0) => {
                        debug!("virtio-vsock: {}: host peer finished sending", self.key);
                        self.host_eof = true;
                        self.rw_pending = false;
                        return self.emit_shutdown();
                    }
                    Ok(n) => {
                        let n = u32::try_from(n).expect("n <= max <= MAX_PKT_DATA");
                        self.rx_cnt += Wrapping(n);
                        if self.peer_credit() == 0 && !self.credit_requested {
                            self.credit_request_due = true;
                        }
                        let mut h = self.header(op::RW);
                        h.len = n;
                        return self.emit(h);
                    }
                    Err(VolatileMemoryError::IOError(e))
                        if e.kind() == io::ErrorKind::WouldBlock =>
                    {
                        self.rw_pending = false;
                    }
                    Err(e) => {
                        warn!(
                            "virtio-vsock: {}: cannot read the host socket: {e}; resetting the stream",
                            self.key
                        );
                        return Fill::Reset;
                    }
                }
            }
        }
        if self.credit_request_due {
            self.credit_request_due = false;
            self.credit_requested = true;
            return self.emit(self.header(op::CREDIT_REQUEST));
        }
        if self.credit_update_due {
            return self.emit(self.header(op::CREDIT_UPDATE));
        }
        Fill::Nothing
    }

    fn emit_shutdown(&mut self) -> Fill {
        self.told_guest |= self.local_shut_flags();
        let mut h = self.header(op::SHUTDOWN);
        h.flags = self.told_guest;
        self.emit(h)
    }

    /// Takes a packet from the guest (not RST: the muxer handles those). `data` is the
    /// payload of an RW packet.
    pub fn on_guest_pkt(&mut self, hdr: &Header, data: Option<&VolatileSlice<'_>>) -> Verdict {
        let credit = self.peer_credit();
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() != credit {
            self.credit_requested = false;
        }
        let verdict = match (self.phase, hdr.op) {
            (Phase::LocalInit, op::RESPONSE) if self.request_sent => self.established(),
            (Phase::Established, op::RW) => self.guest_data(hdr, data),
            (Phase::Established, op::SHUTDOWN) => {
                self.guest_shutdown(hdr.flags);
                Verdict::Keep
            }
            (Phase::Established, op::CREDIT_UPDATE) => Verdict::Keep,
            (Phase::Established | Phase::PeerInit, op::CREDIT_REQUEST) => {
                self.credit_update_due = true;
                Verdict::Keep
            }
            (phase, _) => {
                warn!(
                    "virtio-vsock: {}: unexpected {} from the guest in state {phase:?}; dropped",
                    self.key,
                    op::name(hdr.op)
                );
                Verdict::Keep
            }
        };
        self.update_expiry();
        verdict
    }

    /// The guest accepted a host-initiated stream: tell the host client.
    fn established(&mut self) -> Verdict {
        self.phase = Phase::Established;
        self.expiry = None;
        let line = format!("OK {}\n", self.key.local_port);
        match uds::send(&self.stream, line.as_bytes()) {
            Ok(n) if n == line.len() => {
                debug!("virtio-vsock: {}: established", self.key);
                Verdict::Keep
            }
            Ok(_) => {
                warn!(
                    "virtio-vsock: {}: host client socket full before the OK line; resetting",
                    self.key
                );
                Verdict::Reset
            }
            Err(e) => {
                info!(
                    "virtio-vsock: {}: cannot send the OK line to the host client ({e}); resetting",
                    self.key
                );
                Verdict::Reset
            }
        }
    }

    fn guest_data(&mut self, hdr: &Header, data: Option<&VolatileSlice<'_>>) -> Verdict {
        let Some(data) = data.filter(|d| !d.is_empty()) else {
            debug!("virtio-vsock: {}: empty RW packet dropped", self.key);
            return Verdict::Keep;
        };
        if self.guest_shut & shutdown::SEND != 0 {
            warn!(
                "virtio-vsock: {}: guest sent data after SHUTDOWN(SEND); resetting the stream",
                self.key
            );
            return Verdict::Reset;
        }
        if self.host_hup {
            info!(
                "virtio-vsock: {}: {} bytes from the guest but the host peer hung up; resetting",
                self.key, hdr.len
            );
            return Verdict::Reset;
        }
        if data.len() > self.tx_buf.room() {
            warn!(
                "virtio-vsock: {}: guest sent {} bytes with only {} bytes of credit left; resetting the stream",
                self.key,
                data.len(),
                self.tx_buf.room()
            );
            return Verdict::Reset;
        }
        let mut written = 0;
        if self.tx_buf.is_empty() {
            match uds::send_volatile(&self.stream, data) {
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    info!(
                        "virtio-vsock: {}: cannot write to the host peer ({e}); resetting",
                        self.key
                    );
                    return Verdict::Reset;
                }
            }
        }
        if written < data.len() {
            let rest = match data.subslice(written, data.len() - written) {
                Ok(r) => r,
                Err(e) => {
                    warn!("virtio-vsock: {}: bad packet buffer: {e}", self.key);
                    return Verdict::Reset;
                }
            };
            if self.tx_buf.push(&rest).is_err() {
                // Checked above; cannot happen.
                return Verdict::Reset;
            }
        }
        self.forwarded(written);
        Verdict::Keep
    }

    /// `n` more guest bytes reached the host socket.
    fn forwarded(&mut self, n: usize) {
        self.fwd_cnt += Wrapping(u32::try_from(n).expect("n <= CONN_BUF_ALLOC"));
        if (self.fwd_cnt - self.fwd_cnt_told).0 >= CREDIT_UPDATE_THRESHOLD {
            self.credit_update_due = true;
        }
        self.shut_host_write_if_done();
    }

    fn guest_shutdown(&mut self, flags: u32) {
        if flags & !shutdown::BOTH != 0 {
            debug!(
                "virtio-vsock: {}: unknown SHUTDOWN flags {flags:#x} ignored",
                self.key
            );
        }
        let new = flags & shutdown::BOTH & !self.guest_shut;
        self.guest_shut |= new;
        if new & shutdown::RCV != 0 {
            self.rw_pending = false;
            // The host writer gets EPIPE from now on.
            if let Err(e) = self.stream.shutdown(Shutdown::Read) {
                debug!("virtio-vsock: {}: shutdown(SHUT_RD): {e}", self.key);
            }
        }
        self.shut_host_write_if_done();
    }

    /// After a guest SHUTDOWN(SEND), the host peer gets EOF once it has everything.
    fn shut_host_write_if_done(&mut self) {
        if self.guest_shut & shutdown::SEND != 0 && self.tx_buf.is_empty() && !self.host_write_shut
        {
            self.host_write_shut = true;
            if let Err(e) = self.stream.shutdown(Shutdown::Write) {
                debug!("virtio-vsock: {}: shutdown(SHUT_WR): {e}", self.key);
            }
        }
    }

    /// The host socket is ready (`set` as epoll reported it).
    pub fn on_host_event(&mut self, set: EventSet) -> Verdict {
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) && !self.host_hup {
            self.host_hup = true;
            match self.phase {
                Phase::LocalInit if !self.request_sent => {
                    debug!(
                        "virtio-vsock: {}: host client left before the guest heard of it",
                        self.key
                    );
                    return Verdict::Drop;
                }
                Phase::LocalInit | Phase::PeerInit => {
                    info!(
                        "virtio-vsock: {}: host peer hung up during the handshake; resetting",
                        self.key
                    );
                    return Verdict::Reset;
                }
                Phase::Established => {}
            }
            if !self.tx_buf.is_empty() {
                info!(
                    "virtio-vsock: {}: host peer hung up with {} guest bytes unread; resetting",
                    self.key,
                    self.tx_buf.len()
                );
                return Verdict::Reset;
            }
            // Read what it left before its EOF.
            if self.may_read_host() {
                self.rw_pending = true;
            }
        }
        if set.contains(EventSet::IN) && self.may_read_host() {
            self.rw_pending = true;
        }
        if set.contains(EventSet::OUT) && !self.tx_buf.is_empty() {
            match self.tx_buf.flush_to(&self.stream) {
                Ok(n) => self.forwarded(n),
                Err(e) => {
                    info!(
                        "virtio-vsock: {}: cannot write to the host peer ({e}); resetting",
                        self.key
                    );
                    return Verdict::Reset;
                }
            }
        }
        self.update_expiry();
        Verdict::Keep
    }

    /// Arms the shutdown timeout while a finished stream waits for the host peer to take
    /// the guest's last bytes.
    fn update_expiry(&mut self) {
        let h2g_done = self.host_eof || self.guest_shut & shutdown::RCV != 0;
        let waiting_for_flush = self.phase == Phase::Established
            && h2g_done
            && self.guest_shut & shutdown::SEND != 0
            && !self.tx_buf.is_empty();
        if waiting_for_flush && self.expiry.is_none() {
            self.expiry = Some(Instant::now() + self.timeouts.shutdown);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    const CID: u64 = 3;
    const KEY: ConnKey = ConnKey {
        local_port: 1 << 30,
        peer_port: 1234,
    };

    fn guest_hdr(op: u16, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: KEY.peer_port,
            dst_port: KEY.local_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc,
            fwd_cnt,
            ..Default::default()
        }
    }

    /// An established peer-initiated connection and the host end of its socket.
    fn established(buf_alloc: u32) -> (Connection, UnixStream, Vec<u8>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let hdr = guest_hdr(op::REQUEST, buf_alloc, 0);
        let mut c = Connection::new_peer(ours, KEY, CID, &hdr, Timeouts::default());
        let mut buf = vec![0u8; 4096];
        let slice = VolatileSlice::from(buf.as_mut_slice());
        match c.fill_rx(&slice) {
            Fill::Packet(h) => assert_eq!(h.op, op::RESPONSE),
            f => panic!("{f:?}"),
        }
        assert!(c.is_established());
        (c, theirs, buf)
    }

    #[test]
    fn credit_limits_host_to_guest_and_polling() {
        let (mut c, mut host, mut buf) = established(100);
        assert_eq!(c.interest(), Some(EventSet::IN));
        host.write_all(&[9u8; 300]).unwrap();
        assert_eq!(c.on_host_event(EventSet::IN), Verdict::Keep);
        assert!(c.has_pending_rx());
        assert_eq!(
            c.interest(),
            Some(EventSet::empty()),
            "no IN while data waits"
        );
        let slice = VolatileSlice::from(buf.as_mut_slice());
        let Fill::Packet(h) = c.fill_rx(&slice) else {
            panic!()
        };
        assert_eq!((h.op, h.len), (op::RW, 100));
        // Out of credit: one CREDIT_REQUEST, then silence, and the socket is not polled.
        let Fill::Packet(h) = c.fill_rx(&slice) else {
            panic!()
        };
        assert_eq!(h.op, op::CREDIT_REQUEST);
        assert!(!c.has_pending_rx());
        assert_eq!(c.fill_rx(&slice), Fill::Nothing);
        assert_eq!(c.interest(), Some(EventSet::empty()));
        // The guest consumed 60 bytes: 60 more may go.
        c.on_guest_pkt(&guest_hdr(op::CREDIT_UPDATE, 100, 60), None);
        assert_eq!(c.peer_credit(), 60);
        assert!(c.has_pending_rx());
        let Fill::Packet(h) = c.fill_rx(&slice) else {
            panic!()
        };
        assert_eq!(h.len, 60);
        // A guest that claims more than it got has no credit rather than 4 GiB of it.
        c.on_guest_pkt(&guest_hdr(op::CREDIT_UPDATE, 100, 1000), None);
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn guest_data_over_credit_resets() {
        let (mut c, _host, _) = established(4096);
        let mut big = vec![1u8; CONN_BUF_ALLOC as usize + 1];
        let slice = VolatileSlice::from(big.as_mut_slice());
        let mut h = guest_hdr(op::RW, 4096, 0);
        h.len = u32::try_from(slice.len()).unwrap();
        assert_eq!(c.on_guest_pkt(&h, Some(&slice)), Verdict::Reset);
    }

    #[test]
    fn stalled_host_reader_buffers_up_to_the_credit_then_drains() {
        let (mut c, mut host, _) = established(4096);
        let mut chunk = vec![5u8; 64 << 10];
        let slice = VolatileSlice::from(chunk.as_mut_slice());
        let mut h = guest_hdr(op::RW, 4096, 0);
        h.len = u32::try_from(slice.len()).unwrap();
        // The socket pair's buffer fills; the rest waits in the TX buffer, bounded by the
        // credit we gave.
        let mut sent = 0usize;
        while c.on_guest_pkt(&h, Some(&slice)) == Verdict::Keep {
            sent += slice.len();
            if c.interest().unwrap().contains(EventSet::OUT) && c.tx_buf.room() < slice.len() {
                break;
            }
            assert!(sent < 64 << 20, "never buffered");
        }
        let buffered = c.tx_buf.len();
        assert!(buffered > 0);
        assert_eq!(
            (Wrapping(u32::try_from(sent).unwrap()) - c.fwd_cnt).0 as usize,
            buffered,
            "fwd_cnt counts only what the host socket took"
        );
        // The host reads everything; OUT flushes the buffer.
        host.set_nonblocking(true).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < sent {
            match host.read(&mut sink) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert_eq!(c.on_host_event(EventSet::OUT), Verdict::Keep);
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(c.tx_buf.is_empty());
        assert_eq!(c.fwd_cnt.0 as usize, sent);
        assert!(
            c.credit_update_due,
            "the guest must hear about the freed credit"
        );
    }

    #[test]
    fn shutdowns_finish_the_stream() {
        // Guest SHUTDOWN(SEND): host peer sees EOF, the stream goes on the other way.
        let (mut c, mut host, mut buf) = established(4096);
        let mut s = guest_hdr(op::SHUTDOWN, 4096, 0);
        s.flags = shutdown::SEND;
        assert_eq!(c.on_guest_pkt(&s, None), Verdict::Keep);
        let mut b = [0u8; 1];
        assert_eq!(host.read(&mut b).unwrap(), 0, "host peer sees EOF");
        assert!(!c.finished());
        // Host closes: hang-up, read EOF, SHUTDOWN to the guest, finished.
        drop(host);
        assert_eq!(
            c.on_host_event(EventSet::IN | EventSet::HANG_UP),
            Verdict::Keep
        );
        assert_eq!(c.interest(), None, "a hung-up socket is not polled");
        let slice = VolatileSlice::from(buf.as_mut_slice());
        let Fill::Packet(h) = c.fill_rx(&slice) else {
            panic!()
        };
        assert_eq!((h.op, h.flags), (op::SHUTDOWN, shutdown::RCV));
        let Fill::Packet(h) = c.fill_rx(&slice) else {
            panic!()
        };
        assert_eq!((h.op, h.flags), (op::SHUTDOWN, shutdown::BOTH));
        assert!(c.finished());
    }

    #[test]
    fn request_timeout_and_handshake() {
        let (ours, mut client) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let t = Timeouts {
            request: std::time::Duration::from_millis(0),
            ..Timeouts::default()
        };
        let mut c = Connection::new_local(ours, KEY, CID, t);
        assert!(c.has_pending_rx());
        assert_eq!(c.interest(), Some(EventSet::empty()));
        let mut buf = vec![0u8; 64];
        let slice = VolatileSlice::from(buf.as_mut_slice());
        let Fill::Packet(h) = c.fill_rx(&slice) else {
            panic!()
        };
        assert_eq!(
            (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (op::REQUEST, HOST_CID, CID, KEY.local_port, KEY.peer_port)
        );
        assert!(c.expired(Instant::now()));
        assert_eq!(
            c.on_guest_pkt(&guest_hdr(op::RESPONSE, 4096, 0), None),
            Verdict::Keep
        );
        assert!(!c.expired(Instant::now()));
        let mut line = [0u8; 32];
        let n = client.read(&mut line).unwrap();
        assert_eq!(&line[..n], format!("OK {}\n", KEY.local_port).as_bytes());
    }
}
