//! virtio-vsock driven end to end through the virtio-mmio transport by the host-side test
//! driver playing the guest kernel's vsock driver, against real Unix sockets on the host
//! side. Everything runs on the test thread: host sockets are non-blocking and every wait
//! pumps the device's event loop, with a deadline (no sleeps as synchronization).

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use super::packet::{op, shutdown, Header, HEADER_LEN, HEADER_LEN_U32, HOST_CID, TYPE_STREAM};
use super::*;
use crate::virtio::features::{bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::virtio::mmio::regs;
use crate::virtio::status::DEVICE_NEEDS_RESET;
use crate::virtio::test_utils::{len32, Buf, MmioDriver};
use crate::virtio::{lock, DeviceState, MmioPersist};

const CID: u64 = 3;
const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_millis(100);
const MEM: usize = 32 << 20;
const QSIZE: u16 = 256;
const RX_BUFS: usize = 32;
const RX_DATA: u32 = 4096;
const GUEST_BUF_ALLOC: u32 = 256 << 10;

/// A packet the guest received.
#[derive(Debug, Clone)]
struct Pkt {
    hdr: Header,
    data: Vec<u8>,
}

/// The guest's view of one of its streams (keyed by its guest port).
#[derive(Debug, Clone, Copy)]
struct Flow {
    buf_alloc: u32,
    fwd_cnt: u32,
    fwd_cnt_told: u32,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
}

impl Default for Flow {
    fn default() -> Self {
        Self {
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
        }
    }
}

impl Flow {
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// The guest kernel's vsock driver, over the MMIO test driver.
struct Guest {
    drv: MmioDriver,
    _dir: TempDir,
    uds: PathBuf,
    handler: std::sync::Arc<std::sync::Mutex<VsockHandler>>,
    rx_free: Vec<(GuestAddress, GuestAddress)>,
    rx_posted: HashMap<u16, (GuestAddress, GuestAddress)>,
    tx_hdr: GuestAddress,
    tx_data: GuestAddress,
    inbox: VecDeque<Pkt>,
    flows: HashMap<u32, Flow>,
    /// Receive buffers are one descriptor, header and data together (Linux ≥ 6.2 and
    /// Debian's 6.1: 3776 bytes, 3732 of them data), instead of two.
    single_rx_desc: bool,
}

/// Data room of a single-descriptor receive buffer as Linux sizes it.
const SINGLE_RX_DATA: u32 = 3732;

impl Guest {
    fn new() -> Guest {
        Self::with(Timeouts::default(), bit(VIRTIO_F_VERSION_1))
    }

    fn with(timeouts: Timeouts, features: u64) -> Guest {
        Self::build(timeouts, features, RX_BUFS)
    }

    /// A guest with the default features and the timeouts `tweak` sets.
    fn with_timeouts(tweak: impl FnOnce(&mut Timeouts)) -> Guest {
        let mut t = Timeouts::default();
        tweak(&mut t);
        Self::with(t, bit(VIRTIO_F_VERSION_1))
    }

    /// A guest with `rx_bufs` receive buffers posted.
    fn build(timeouts: Timeouts, features: u64, rx_bufs: usize) -> Guest {
        let dir = TempDir::new_with_prefix("/tmp/vsock-test").unwrap();
        let uds = dir.as_path().join("v.sock");
        let dev = Vsock::with_timeouts(CID, &uds, timeouts).unwrap();
        let handler = dev.handler();
        let mut drv = MmioDriver::new(Box::new(dev), MEM);
        drv.activate(features, QSIZE);
        let rx_free = (0..rx_bufs)
            .map(|_| {
                let h = drv.alloc(HEADER_LEN as u64 + u64::from(RX_DATA));
                (h, h.unchecked_add(HEADER_LEN as u64))
            })
            .collect();
        let tx_hdr = drv.alloc(HEADER_LEN as u64);
        let tx_data = drv.alloc(MAX_PKT_DATA.into());
        let mut g = Guest {
            drv,
            _dir: dir,
            uds,
            handler,
            rx_free,
            rx_posted: HashMap::new(),
            tx_hdr,
            tx_data,
            inbox: VecDeque::new(),
            flows: HashMap::new(),
            single_rx_desc: false,
        };
        g.post_rx();
        g
    }

    /// `<uds>_<port>`: where guest connections to host port `port` go.
    fn port_path(&self, port: u32) -> PathBuf {
        uds::port_path(&self.uds, port)
    }

    fn listen(&self, port: u32) -> UnixListener {
        let l = UnixListener::bind(self.port_path(port)).unwrap();
        l.set_nonblocking(true).unwrap();
        l
    }

    fn connect_uds(&self) -> UnixStream {
        let s = UnixStream::connect(&self.uds).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    }

    /// A host client that connected and wrote `first` (e.g. its CONNECT line).
    fn client(&self, first: &[u8]) -> UnixStream {
        let mut s = self.connect_uds();
        s.write_all(first).unwrap();
        s
    }

    fn connections(&self) -> usize {
        lock(&self.handler).connection_count()
    }

    fn flow(&mut self, gport: u32) -> &mut Flow {
        self.flows.entry(gport).or_default()
    }

    /// Posts every free receive buffer (header and data descriptors, as Linux 6.1 does).
    fn post_rx(&mut self) {
        if self.rx_free.is_empty() {
            return;
        }
        for (h, d) in std::mem::take(&mut self.rx_free) {
            let two = [(h, HEADER_LEN_U32, true), (d, RX_DATA, true)];
            let one = [(h, HEADER_LEN_U32 + SINGLE_RX_DATA, true)];
            let bufs: &[Buf] = if self.single_rx_desc { &one } else { &two };
            let head = self.drv.queues[RXQ].add_chain(&self.drv.mem, bufs);
            self.rx_posted.insert(head, (h, d));
        }
        self.drv.kick_queue(RXQ);
    }

    /// A header from guest port `gport` to host port `hport` with the flow's credit.
    fn hdr(&mut self, op: u16, gport: u32, hport: u32) -> Header {
        let f = *self.flow(gport);
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: gport,
            dst_port: hport,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: f.buf_alloc,
            fwd_cnt: f.fwd_cnt,
        }
    }

    /// Puts a raw chain on the TX queue and waits until the device returns it.
    fn send_chain(&mut self, bufs: &[Buf]) -> (u32, u32) {
        self.drv.submit(TXQ, bufs);
        let used = self.drv.wait_used(TXQ, 1, WAIT);
        assert_eq!(used.len(), 1);
        used[0]
    }

    /// Sends `hdr` (its `len` as given) with `data` in a second descriptor.
    fn send(&mut self, hdr: Header, data: &[u8]) {
        self.drv.write_mem(self.tx_hdr, &hdr.to_bytes());
        let mut bufs = vec![(self.tx_hdr, HEADER_LEN_U32, false)];
        if !data.is_empty() {
            self.drv.write_mem(self.tx_data, data);
            bufs.push((self.tx_data, len32(data.len()), false));
        }
        let (_, len) = self.send_chain(&bufs);
        assert_eq!(len, 0, "tx chains come back with used length 0");
        if hdr.op != op::RW {
            let f = self.flow(hdr.src_port);
            f.fwd_cnt_told = hdr.fwd_cnt;
        }
    }

    fn send_op(&mut self, op: u16, gport: u32, hport: u32) {
        let h = self.hdr(op, gport, hport);
        self.send(h, &[]);
    }

    fn send_shutdown(&mut self, gport: u32, hport: u32, flags: u32) {
        let mut h = self.hdr(op::SHUTDOWN, gport, hport);
        h.flags = flags;
        self.send(h, &[]);
    }

    /// One RW packet.
    fn send_data(&mut self, gport: u32, hport: u32, data: &[u8]) {
        let mut h = self.hdr(op::RW, gport, hport);
        h.len = len32(data.len());
        self.send(h, data);
        let f = self.flow(gport);
        f.tx_cnt = f.tx_cnt.wrapping_add(len32(data.len()));
        f.fwd_cnt_told = h.fwd_cnt;
    }

    /// Runs the device for one event-loop turn and collects what it sent.
    fn poll(&mut self) {
        self.drv.run_events(5);
        for (id, len) in self.drv.queues[RXQ].take_used(&self.drv.mem) {
            let (h, d) = self
                .rx_posted
                .remove(&u16::try_from(id).unwrap())
                .expect("used id of a posted buffer");
            self.rx_free.push((h, d));
            assert!(len as usize >= HEADER_LEN, "rx used length {len}");
            let hdr = Header::from_bytes(&self.drv.read_mem(h, HEADER_LEN)).unwrap();
            assert_eq!(len as usize, HEADER_LEN + hdr.len as usize, "{hdr}");
            let data = self.drv.read_mem(d, hdr.len as usize);
            assert_eq!(
                (hdr.src_cid, hdr.dst_cid, hdr.type_),
                (HOST_CID, CID, TYPE_STREAM)
            );
            if hdr.op != op::RST {
                let f = self.flow(hdr.dst_port);
                f.peer_buf_alloc = hdr.buf_alloc;
                f.peer_fwd_cnt = hdr.fwd_cnt;
            }
            self.inbox.push_back(Pkt { hdr, data });
        }
        self.post_rx();
    }

    /// The next packet for guest port `gport`.
    fn recv(&mut self, gport: u32) -> Pkt {
        let start = Instant::now();
        loop {
            if let Some(i) = self.inbox.iter().position(|p| p.hdr.dst_port == gport) {
                return self.inbox.remove(i).unwrap();
            }
            assert!(
                start.elapsed() < WAIT,
                "no packet for guest port {gport}; inbox {:?}",
                self.inbox.iter().map(|p| p.hdr).collect::<Vec<_>>()
            );
            self.poll();
        }
    }

    fn recv_op(&mut self, gport: u32, want: u16) -> Pkt {
        let p = self.recv(gport);
        assert_eq!(
            p.hdr.op,
            want,
            "expected {} for port {gport}, got {}",
            op::name(want),
            p.hdr
        );
        p
    }

    /// The next packet for `gport` is SHUTDOWN with `flags`.
    fn recv_shutdown(&mut self, gport: u32, flags: u32) {
        let p = self.recv_op(gport, op::SHUTDOWN);
        assert_eq!(p.hdr.flags, flags, "{}", p.hdr);
    }

    /// Runs the device for `QUIET` and checks that it sent nothing more for `gport`.
    fn expect_quiet(&mut self, gport: u32) {
        let before = self.inbox.len();
        let start = Instant::now();
        while start.elapsed() < QUIET {
            self.poll();
        }
        let stray: Vec<_> = self
            .inbox
            .iter()
            .skip(before)
            .filter(|p| p.hdr.dst_port == gport)
            .map(|p| p.hdr)
            .collect();
        assert!(stray.is_empty(), "unexpected packets: {stray:?}");
    }

    /// Reads `n` stream bytes for `gport` like a guest application, handing back credit as
    /// it goes (a CREDIT_UPDATE each 32 KiB, and on CREDIT_REQUEST).
    fn read_stream(&mut self, gport: u32, hport: u32, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let p = self.recv(gport);
            assert_eq!(p.hdr.src_port, hport, "{}", p.hdr);
            match p.hdr.op {
                op::RW => {
                    out.extend_from_slice(&p.data);
                    self.consume(gport, len32(p.data.len()));
                    let f = *self.flow(gport);
                    if f.fwd_cnt.wrapping_sub(f.fwd_cnt_told) >= 32 << 10 {
                        self.send_op(op::CREDIT_UPDATE, gport, hport);
                    }
                }
                op::CREDIT_REQUEST => self.send_op(op::CREDIT_UPDATE, gport, hport),
                op::CREDIT_UPDATE => {}
                _ => panic!("unexpected {} while reading", p.hdr),
            }
        }
        assert_eq!(out.len(), n, "read past the expected data");
        out
    }

    fn consume(&mut self, gport: u32, n: u32) {
        let f = self.flow(gport);
        f.fwd_cnt = f.fwd_cnt.wrapping_add(n);
    }

    /// Sends `data` as RW packets of at most `chunk` bytes, within the device's credit.
    fn write_stream(&mut self, gport: u32, hport: u32, data: &[u8], chunk: usize) {
        let mut sent = 0;
        let start = Instant::now();
        while sent < data.len() {
            let credit = self.flow(gport).peer_credit() as usize;
            if credit == 0 {
                assert!(start.elapsed() < WAIT, "no credit from the device");
                self.poll();
                self.take_credit_updates(gport);
                continue;
            }
            let n = chunk.min(credit).min(data.len() - sent);
            self.send_data(gport, hport, &data[sent..sent + n]);
            sent += n;
        }
    }

    /// Sends `data` from its start while the device gives credit (the host peer does not
    /// read); returns how much went before the guest ran out of credit.
    fn fill_until_stalled(&mut self, gport: u32, hport: u32, data: &[u8]) -> usize {
        let mut sent = 0;
        loop {
            self.poll();
            self.take_credit_updates(gport);
            let credit = self.flow(gport).peer_credit() as usize;
            if credit == 0 {
                return sent;
            }
            let n = credit.min(MAX_PKT_DATA as usize);
            assert!(sent + n <= data.len(), "the device gives credit forever");
            self.send_data(gport, hport, &data[sent..sent + n]);
            sent += n;
        }
    }

    /// Drops CREDIT_UPDATE packets for `gport` from the inbox (their credit was noted).
    fn take_credit_updates(&mut self, gport: u32) {
        self.inbox
            .retain(|p| !(p.hdr.dst_port == gport && p.hdr.op == op::CREDIT_UPDATE));
    }

    /// The whole host-initiated handshake: `CONNECT gport` on the VM socket, REQUEST in the
    /// guest, RESPONSE, `OK <hport>` on the socket. Returns the socket and the host port.
    fn host_connect(&mut self, gport: u32) -> (UnixStream, u32) {
        let mut s = self.connect_uds();
        s.write_all(format!("CONNECT {gport}\n").as_bytes())
            .unwrap();
        let req = self.recv_op(gport, op::REQUEST);
        let hport = req.hdr.src_port;
        assert!(
            hport >= 1 << 30,
            "host ports of host-initiated streams: {hport}"
        );
        assert_eq!(req.hdr.buf_alloc, CONN_BUF_ALLOC);
        self.send_op(op::RESPONSE, gport, hport);
        let line = self.host_read(&mut s, format!("OK {hport}\n").len());
        assert_eq!(line, format!("OK {hport}\n").as_bytes());
        (s, hport)
    }

    /// [`Guest::host_connect`] with the guest offering only `buf_alloc` bytes of credit.
    fn host_connect_with_credit(&mut self, gport: u32, buf_alloc: u32) -> (UnixStream, u32) {
        self.flow(gport).buf_alloc = buf_alloc;
        self.host_connect(gport)
    }

    /// A guest connect to host port `hport` (someone listens on `listener`): REQUEST,
    /// RESPONSE, accept. Returns the host end.
    fn guest_connect(&mut self, gport: u32, hport: u32, listener: &UnixListener) -> UnixStream {
        self.send_op(op::REQUEST, gport, hport);
        let resp = self.recv_op(gport, op::RESPONSE);
        assert_eq!(resp.hdr.src_port, hport);
        let (s, _) = listener.accept().expect("the device connected");
        s.set_nonblocking(true).unwrap();
        s
    }

    /// Reads exactly `n` bytes from a host socket, running the device meanwhile.
    fn host_read(&mut self, s: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        let mut got = 0;
        let start = Instant::now();
        while got < n {
            match s.read(&mut out[got..]) {
                Ok(0) => panic!("EOF after {got} of {n} bytes"),
                Ok(k) => got += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(start.elapsed() < WAIT, "{got} of {n} bytes");
                    self.poll();
                }
                Err(e) => panic!("{e}"),
            }
        }
        out
    }

    /// Waits for EOF (or a reset) on a host socket; returns the bytes read before it.
    fn host_read_to_end(&mut self, s: &mut UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = [0u8; 4096];
        let start = Instant::now();
        loop {
            match s.read(&mut b) {
                Ok(0) => return out,
                Ok(k) => out.extend_from_slice(&b[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(start.elapsed() < WAIT, "no EOF");
                    self.poll();
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Checks that a host socket has neither data nor EOF after running the device.
    fn host_quiet(&mut self, s: &mut UnixStream) {
        let start = Instant::now();
        while start.elapsed() < QUIET {
            self.poll();
        }
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("host socket not quiet: {other:?}"),
        }
    }

    /// Writes all of `data` to a host socket, running the device meanwhile.
    fn host_write(&mut self, s: &mut UnixStream, data: &[u8]) {
        let mut sent = 0;
        let start = Instant::now();
        while sent < data.len() {
            match s.write(&data[sent..]) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(start.elapsed() < WAIT, "host write stuck");
                    self.poll();
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Polls until `cond` holds.
    fn until(&mut self, what: &str, mut cond: impl FnMut(&mut Guest) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
            self.poll();
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            i.to_le_bytes()[0]
                .wrapping_mul(13)
                .wrapping_add(seed ^ (i >> 12).to_le_bytes()[0])
        })
        .collect()
}

// ---- construction, config, state -------------------------------------------------------

#[test]
fn config_space_features_and_state() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("vm.sock");
    let dev = Vsock::new(CID, &path).unwrap();
    assert_eq!(dev.uds_path(), path);
    assert!(path.exists());
    let state = dev.state();
    assert_eq!(state.guest_cid, CID);
    assert_eq!(state.uds_path, path);
    let mut drv = MmioDriver::new(Box::new(dev), 1 << 20);
    assert_eq!(drv.read32(regs::DEVICE_ID), 19);
    assert_eq!(drv.read_config(0, 8), CID.to_le_bytes());
    // Linux reads the 64-bit field as two 32-bit halves.
    assert_eq!(drv.read_config(0, 4), 3u32.to_le_bytes());
    assert_eq!(drv.read_config(4, 4), [0; 4]);
    assert_eq!(drv.read_config(8, 4), [0; 4]);
    // Config writes are ignored.
    crate::bus::BusDevice::write(&mut drv.transport, regs::CONFIG, &[9; 8]);
    assert_eq!(drv.read_config(0, 8), CID.to_le_bytes());
    let feats = drv.device_features();
    assert_ne!(feats & bit(VIRTIO_F_VERSION_1), 0);
    for q in 0..3 {
        drv.write32(regs::QUEUE_SEL, q);
        assert_eq!(drv.read32(regs::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
    }
    drv.write32(regs::QUEUE_SEL, 3);
    assert_eq!(drv.read32(regs::QUEUE_NUM_MAX), 0, "only three queues");
    drv.activate(bit(VIRTIO_F_VERSION_1), 64);
    assert_eq!(
        drv.transport.device().acked_features(),
        bit(VIRTIO_F_VERSION_1)
    );
    drop(drv);
    assert!(!path.exists(), "the socket file is removed with the device");
}

#[test]
fn constructor_errors_say_what_to_do() {
    let dir = TempDir::new().unwrap();
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let e = Vsock::new(cid, dir.as_path().join("a.sock")).err().unwrap();
        assert!(matches!(e, VsockError::InvalidCid(_)), "{cid}: {e}");
        assert!(e.to_string().contains("use 3 or above"));
    }
    let long = dir.as_path().join("d".repeat(110));
    let e = Vsock::new(CID, &long).err().unwrap();
    assert!(e.to_string().contains("longer than the 107"), "{e}");
    let e = Vsock::new(CID, dir.as_path().join("nope/v.sock"))
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("does not exist: create it first"),
        "{e}"
    );
    // A stale socket is replaced; a live one is refused.
    let path = dir.as_path().join("v.sock");
    drop(UnixListener::bind(&path).unwrap());
    let live = Vsock::new(CID, &path).unwrap();
    let e = Vsock::new(CID, &path).err().unwrap();
    assert!(
        matches!(e, VsockError::Socket(UdsError::InUse { .. })),
        "{e}"
    );
    drop(live);
    assert!(!path.exists());
}

// ---- host → guest ------------------------------------------------------------------------

#[test]
fn host_connects_to_guest_and_data_flows_both_ways() {
    let mut g = Guest::new();
    let (mut s, hport) = g.host_connect(1234);
    assert_eq!(g.connections(), 1);

    // Host → guest, several KiB.
    let up = pattern(10_000, 1);
    g.host_write(&mut s, &up);
    assert_eq!(g.read_stream(1234, hport, up.len()), up);

    // Guest → host.
    let down = pattern(9_000, 2);
    g.write_stream(1234, hport, &down, 4096);
    assert_eq!(g.host_read(&mut s, down.len()), down);

    // The host client leaves: the guest hears SHUTDOWN, then the stream is reset.
    drop(s);
    g.recv_shutdown(1234, shutdown::RCV);
    g.recv_shutdown(1234, shutdown::BOTH);
    g.recv_op(1234, op::RST);
    assert_eq!(g.connections(), 0);
}

#[test]
fn connect_line_split_across_writes_and_data_right_behind_it() {
    let mut g = Guest::new();
    let mut s = g.client(b"conn");
    g.expect_quiet(77);
    // The line's end and the first stream bytes arrive together: the device must not
    // swallow the bytes after the newline.
    s.write_all(b"ect 77\r\nearly bytes").unwrap();
    let req = g.recv_op(77, op::REQUEST);
    let hport = req.hdr.src_port;
    g.send_op(op::RESPONSE, 77, hport);
    assert_eq!(
        g.host_read(&mut s, format!("OK {hport}\n").len()),
        format!("OK {hport}\n").as_bytes()
    );
    assert_eq!(g.read_stream(77, hport, 11), b"early bytes");
}

#[test]
fn bad_connect_lines_close_the_client() {
    let mut g = Guest::with_timeouts(|t| t.connect_line = Duration::from_millis(200));
    let mut garbage = g.client(b"HELLO 12\n");
    let mut no_newline = g.client(&[b'x'; 40]);
    let mut bad_port = g.client(b"CONNECT 99999999999\n");
    let mut silent = g.connect_uds();
    for s in [&mut garbage, &mut no_newline, &mut bad_port, &mut silent] {
        assert!(g.host_read_to_end(s).is_empty());
    }
    assert_eq!(lock(&g.handler).pending_client_count(), 0);
    assert_eq!(g.connections(), 0);
    assert!(g.inbox.is_empty(), "the guest heard nothing: {:?}", g.inbox);
}

#[test]
fn no_guest_listener_closes_the_host_client() {
    let mut g = Guest::new();
    let mut s = g.client(b"CONNECT 5000\n");
    let req = g.recv_op(5000, op::REQUEST);
    // Linux answers RST when nothing listens.
    g.send_op(op::RST, 5000, req.hdr.src_port);
    assert!(g.host_read_to_end(&mut s).is_empty(), "no OK line");
    assert_eq!(g.connections(), 0);
}

#[test]
fn unanswered_request_times_out() {
    let mut g = Guest::with_timeouts(|t| t.request = Duration::from_millis(100));
    let mut s = g.client(b"CONNECT 6000\n");
    let req = g.recv_op(6000, op::REQUEST);
    // The guest says nothing: the client is closed and the guest told to forget it.
    assert!(g.host_read_to_end(&mut s).is_empty());
    let rst = g.recv_op(6000, op::RST);
    assert_eq!(rst.hdr.src_port, req.hdr.src_port);
    assert_eq!(g.connections(), 0);
    // A late RESPONSE is answered with RST.
    g.send_op(op::RESPONSE, 6000, req.hdr.src_port);
    g.recv_op(6000, op::RST);
}

#[test]
fn requests_wait_for_the_driver() {
    // A host client may connect before the guest driver is up.
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("v.sock");
    let dev = Vsock::new(CID, &path).unwrap();
    let mut drv = MmioDriver::new(Box::new(dev), MEM);
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 42\n").unwrap();
    for _ in 0..10 {
        drv.run_events(5);
    }
    drv.activate(bit(VIRTIO_F_VERSION_1), 16);
    let h = drv.alloc(64);
    let d = drv.alloc(4096);
    drv.submit(RXQ, &[(h, HEADER_LEN_U32, true), (d, 4096, true)]);
    let used = drv.wait_used(RXQ, 1, WAIT);
    assert_eq!(used[0].1 as usize, HEADER_LEN);
    let hdr = Header::from_bytes(&drv.read_mem(h, HEADER_LEN)).unwrap();
    assert_eq!((hdr.op, hdr.dst_port), (op::REQUEST, 42));
}

// ---- guest → host ------------------------------------------------------------------------

#[test]
fn guest_connects_to_a_host_listener() {
    let mut g = Guest::new();
    let listener = g.listen(1024);
    let mut s = g.guest_connect(40_000, 1024, &listener);
    assert_eq!(g.connections(), 1);
    let down = pattern(12_345, 3);
    g.write_stream(40_000, 1024, &down, 4096);
    assert_eq!(g.host_read(&mut s, down.len()), down);
    let up = pattern(7_777, 4);
    g.host_write(&mut s, &up);
    assert_eq!(g.read_stream(40_000, 1024, up.len()), up);
    // The guest resets: the host end is closed.
    g.send_op(op::RST, 40_000, 1024);
    assert!(g.host_read_to_end(&mut s).is_empty());
    assert_eq!(g.connections(), 0);
}

#[test]
fn guest_connect_without_host_listener_gets_rst() {
    let mut g = Guest::new();
    g.send_op(op::REQUEST, 40_001, 2222);
    let rst = g.recv_op(40_001, op::RST);
    assert_eq!(rst.hdr.src_port, 2222);
    assert_eq!(g.connections(), 0);
    // A stale socket file with nobody behind it: RST as well.
    drop(g.listen(2223));
    g.send_op(op::REQUEST, 40_002, 2223);
    g.recv_op(40_002, op::RST);
}

#[test]
fn one_mib_each_way_in_chunks() {
    // With EVENT_IDX negotiated, as Linux does.
    let mut g = Guest::with(
        Timeouts::default(),
        bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX),
    );
    let listener = g.listen(1025);
    let mut s = g.guest_connect(40_003, 1025, &listener);
    let size = 1 << 20;

    // Guest → host in 16 KiB packets while the host reads.
    let down = pattern(size, 5);
    let mut got = Vec::with_capacity(size);
    let mut sent = 0;
    let mut buf = vec![0u8; 64 << 10];
    let start = Instant::now();
    while got.len() < size {
        assert!(start.elapsed() < WAIT * 3, "stuck at {} bytes", got.len());
        let credit = g.flow(40_003).peer_credit() as usize;
        if sent < size && credit > 0 {
            let n = (16 << 10).min(credit).min(size - sent);
            g.send_data(40_003, 1025, &down[sent..sent + n]);
            sent += n;
        }
        match s.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => g.poll(),
            Err(e) => panic!("{e}"),
        }
        g.take_credit_updates(40_003);
    }
    assert!(got == down, "guest → host data differs");

    // Host → guest: the host writes as fast as the device takes it.
    let up = pattern(size, 6);
    let mut written = 0;
    let mut received = Vec::with_capacity(size);
    let start = Instant::now();
    while received.len() < size {
        assert!(
            start.elapsed() < WAIT * 3,
            "stuck at {} bytes",
            received.len()
        );
        if written < size {
            match s.write(&up[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        g.poll();
        while let Some(i) = g.inbox.iter().position(|p| p.hdr.dst_port == 40_003) {
            let p = g.inbox.remove(i).unwrap();
            match p.hdr.op {
                op::RW => {
                    assert!(p.data.len() <= RX_DATA as usize);
                    received.extend_from_slice(&p.data);
                    g.consume(40_003, len32(p.data.len()));
                }
                op::CREDIT_REQUEST | op::CREDIT_UPDATE => {}
                _ => panic!("unexpected {}", p.hdr),
            }
            let f = *g.flow(40_003);
            if f.fwd_cnt.wrapping_sub(f.fwd_cnt_told) >= 64 << 10 || p.hdr.op == op::CREDIT_REQUEST
            {
                g.send_op(op::CREDIT_UPDATE, 40_003, 1025);
            }
        }
    }
    assert!(received == up, "host → guest data differs");
}

// ---- flow control -------------------------------------------------------------------------

#[test]
fn credit_exhaustion_stops_the_device_until_a_credit_update() {
    let mut g = Guest::new();
    let listener = g.listen(1026);
    g.flow(40_004).buf_alloc = 8192;
    let mut s = g.guest_connect(40_004, 1026, &listener);
    let data = pattern(20_000, 7);
    g.host_write(&mut s, &data);

    // Exactly the 8 KiB of credit arrive, then a CREDIT_REQUEST, then nothing.
    let mut got = Vec::new();
    while got.len() < 8192 {
        let p = g.recv_op(40_004, op::RW);
        got.extend_from_slice(&p.data);
    }
    assert_eq!(got.len(), 8192, "the device overran the guest's credit");
    g.recv_op(40_004, op::CREDIT_REQUEST);
    g.expect_quiet(40_004);

    // The guest application read 5000 bytes: exactly 5000 more come.
    g.consume(40_004, 5000);
    g.send_op(op::CREDIT_UPDATE, 40_004, 1026);
    let mut more = Vec::new();
    while more.len() < 5000 {
        more.extend_from_slice(&g.recv_op(40_004, op::RW).data);
    }
    assert_eq!(more.len(), 5000);
    got.extend_from_slice(&more);
    // Out of credit again: asked once more, then silence.
    g.recv_op(40_004, op::CREDIT_REQUEST);
    g.expect_quiet(40_004);

    // Plenty of credit: the rest flows.
    g.consume(40_004, 8192);
    g.send_op(op::CREDIT_UPDATE, 40_004, 1026);
    let rest = g.read_stream(40_004, 1026, data.len() - got.len());
    got.extend_from_slice(&rest);
    assert!(got == data);
}

#[test]
fn guest_sending_beyond_its_credit_is_reset() {
    let mut g = Guest::new();
    let listener = g.listen(1027);
    let mut s = g.guest_connect(40_005, 1027, &listener);
    // The host never reads; the guest ignores the credit it was given.
    let chunk = vec![0xabu8; MAX_PKT_DATA as usize];
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < WAIT);
        g.send_data(40_005, 1027, &chunk);
        g.poll();
        if g.inbox.iter().any(|p| p.hdr.op == op::RST) {
            break;
        }
    }
    let sent = g.flow(40_005).tx_cnt as usize;
    assert!(
        sent > CONN_BUF_ALLOC as usize,
        "reset only beyond the credit ({sent})"
    );
    g.inbox.retain(|p| p.hdr.op != op::CREDIT_UPDATE);
    g.recv_op(40_005, op::RST);
    // The host side is closed (after what made it to the socket).
    let got = g.host_read_to_end(&mut s);
    assert!(got.len() < sent);
    assert_eq!(g.connections(), 0);
}

#[test]
fn a_stalled_stream_does_not_block_the_others() {
    let mut g = Guest::new();
    // A: the guest gives it 4 KiB of credit and never reads: host → guest stalls.
    let (mut a, ha) = g.host_connect_with_credit(100, 4096);
    // C: the host never reads: guest → host stalls at the device's credit.
    let listener = g.listen(1028);
    let mut c = g.guest_connect(300, 1028, &listener);
    // B: flows both ways meanwhile.
    let (mut b, hb) = g.host_connect(200);

    let big = pattern(512 << 10, 8);
    // The host writer of A fills its socket buffer; it stays stuck.
    let mut a_written = 0;
    while let Ok(n) = a.write(&big[a_written..]) {
        a_written += n;
    }
    // The guest pushes C until the device stops giving credit.
    let c_data = pattern(4 << 20, 9);
    let c_sent = g.fill_until_stalled(300, 1028, &c_data);
    assert!(c_sent >= CONN_BUF_ALLOC as usize);

    let up = pattern(300 << 10, 10);
    let down = pattern(300 << 10, 11);
    let mut up_written = 0;
    let mut up_got = Vec::new();
    let start = Instant::now();
    while up_written < up.len() || up_got.len() < up.len() {
        assert!(start.elapsed() < WAIT * 3, "stream B stalled");
        if let Ok(n) = b.write(&up[up_written..]) {
            up_written += n;
        }
        g.poll();
        while let Some(i) = g.inbox.iter().position(|p| p.hdr.dst_port == 200) {
            let p = g.inbox.remove(i).unwrap();
            if p.hdr.op == op::RW {
                up_got.extend_from_slice(&p.data);
                g.consume(200, len32(p.data.len()));
                g.send_op(op::CREDIT_UPDATE, 200, hb);
            }
        }
    }
    assert!(up_got == up);
    g.write_stream(200, hb, &down, 32 << 10);
    assert!(g.host_read(&mut b, down.len()) == down);

    // A got exactly its credit, then asked for more; C got nothing more through.
    let a_pkts: Vec<_> = g
        .inbox
        .iter()
        .filter(|p| p.hdr.dst_port == 100)
        .cloned()
        .collect();
    let a_bytes: usize = a_pkts
        .iter()
        .filter(|p| p.hdr.op == op::RW)
        .map(|p| p.data.len())
        .sum();
    assert_eq!(
        a_bytes,
        4096,
        "{:?}",
        a_pkts.iter().map(|p| p.hdr).collect::<Vec<_>>()
    );
    g.take_credit_updates(300);
    assert_eq!(g.flow(300).peer_credit(), 0, "C is still stalled");
    // Both stalled streams recover.
    g.inbox.retain(|p| p.hdr.dst_port != 100);
    g.consume(100, 4096);
    g.send_op(op::CREDIT_UPDATE, 100, ha);
    let a_rest = g.read_stream(100, ha, 8192);
    assert_eq!(a_rest, big[4096..4096 + 8192]);
    assert!(g.host_read(&mut c, c_sent) == c_data[..c_sent]);
    assert_eq!(g.connections(), 3);
}

#[test]
fn stalled_and_hung_up_streams_do_not_spin_the_event_loop() {
    let mut g = Guest::new();
    // A: the guest gave 4 KiB of credit; the host wrote more and waits.
    let (mut a, _) = g.host_connect_with_credit(100, 4096);
    let _ = a.write(&[1; 64 << 10]).unwrap();
    // B: the same, but the host hung up after writing.
    let (mut b, hb) = g.host_connect_with_credit(101, 4096);
    b.write_all(&pattern(16 << 10, 15)).unwrap();
    drop(b);
    // C: guest → host, the host never reads.
    let listener = g.listen(1040);
    let _c = g.guest_connect(300, 1040, &listener);
    g.fill_until_stalled(300, 1040, &pattern(4 << 20, 16));
    // D: a host client in the middle of its CONNECT line.
    let _d = g.client(b"CONN");

    let rw = |g: &Guest, port: u32| -> usize {
        g.inbox
            .iter()
            .filter(|p| p.hdr.dst_port == port && p.hdr.op == op::RW)
            .map(|p| p.data.len())
            .sum()
    };
    g.until("A and B to use up their credit", |g| {
        rw(g, 100) == 4096
            && rw(g, 101) == 4096
            && g.inbox
                .iter()
                .any(|p| p.hdr.dst_port == 101 && p.hdr.op == op::SHUTDOWN)
    });
    g.expect_quiet(100);
    // Now nothing can move: the device must not wake the loop at all.
    let mut events = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(200) {
        events += g.drv.run_events(5);
    }
    assert_eq!(
        events, 0,
        "the device kept waking the event loop while idle"
    );

    // B's data is still delivered once the guest reads, then its end.
    g.inbox
        .retain(|p| p.hdr.dst_port != 101 || p.hdr.op == op::SHUTDOWN);
    g.consume(101, 4096);
    g.flow(101).buf_alloc = GUEST_BUF_ALLOC;
    g.send_op(op::CREDIT_UPDATE, 101, hb);
    // The host can no longer receive.
    g.recv_shutdown(101, shutdown::RCV);
    assert_eq!(
        g.read_stream(101, hb, 12 << 10),
        pattern(16 << 10, 15)[4096..]
    );
    g.recv_shutdown(101, shutdown::BOTH);
    g.recv_op(101, op::RST);
}

#[test]
fn indirect_descriptors_both_ways() {
    use crate::virtio::test_utils::{DESC_INDIRECT, DESC_NEXT, DESC_WRITE};
    let features =
        bit(VIRTIO_F_VERSION_1) | bit(crate::virtio::features::VIRTIO_RING_F_INDIRECT_DESC);
    let mut g = Guest::build(Timeouts::default(), features, 0);
    let (n, w, ind) = (DESC_NEXT, DESC_WRITE, DESC_INDIRECT);
    // Writes a descriptor table and puts one INDIRECT descriptor for it on queue `q`.
    let submit_indirect = |g: &mut Guest, q: usize, descs: &[Descriptor]| {
        let table = g.drv.alloc(16 * descs.len() as u64);
        for (i, d) in descs.iter().enumerate() {
            g.drv.write_mem(
                GuestAddress(table.0 + 16 * i as u64),
                vm_memory::ByteValued::as_slice(&virtio_queue::desc::RawDescriptor::from(*d)),
            );
        }
        let head = g.drv.queues[q].add_chain(&g.drv.mem, &[(table, 1, false)]);
        g.drv.queues[q].store_raw(
            &g.drv.mem,
            head,
            &[Descriptor::new(table.0, 16 * len32(descs.len()), ind, 0)],
        );
        g.drv.kick_queue(q);
    };
    // An RX buffer as Linux posts it with INDIRECT_DESC: header + data in a table.
    let (rh, rd) = (g.drv.alloc(64), g.drv.alloc(4096));
    submit_indirect(
        &mut g,
        RXQ,
        &[
            Descriptor::new(rh.0, 44, w | n, 1),
            Descriptor::new(rd.0, 4096, w, 0),
        ],
    );
    let mut s = g.client(b"CONNECT 90\n");
    let used = g.drv.wait_used(RXQ, 1, WAIT);
    assert_eq!(used[0].1 as usize, HEADER_LEN);
    let req = Header::from_bytes(&g.drv.read_mem(rh, HEADER_LEN)).unwrap();
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 90));
    // TX: RESPONSE, then RW with header and payload in an indirect table.
    let hport = req.src_port;
    let th = g.drv.alloc(64);
    let td = g.drv.alloc(64);
    let h = g.hdr(op::RESPONSE, 90, hport);
    g.drv.write_mem(th, &h.to_bytes());
    submit_indirect(&mut g, TXQ, &[Descriptor::new(th.0, 44, 0, 0)]);
    g.drv.wait_used(TXQ, 1, WAIT);
    let ok = format!("OK {hport}\n");
    assert_eq!(g.host_read(&mut s, ok.len()), ok.as_bytes());
    let mut h = g.hdr(op::RW, 90, hport);
    h.len = 8;
    g.drv.write_mem(th, &h.to_bytes());
    g.drv.write_mem(td, b"indirect");
    submit_indirect(
        &mut g,
        TXQ,
        &[
            Descriptor::new(th.0, 44, n, 1),
            Descriptor::new(td.0, 8, 0, 0),
        ],
    );
    g.drv.wait_used(TXQ, 1, WAIT);
    assert_eq!(g.host_read(&mut s, 8), b"indirect");
}

#[test]
fn many_concurrent_streams() {
    let mut g = Guest::new();
    let n = 24u32;
    let mut streams: Vec<_> = (0..n).map(|i| g.host_connect(2000 + i)).collect();
    let listeners: Vec<_> = (0..n).map(|i| g.listen(3000 + i)).collect();
    let mut back: Vec<_> = (0..n)
        .map(|i| g.guest_connect(4000 + i, 3000 + i, &listeners[i as usize]))
        .collect();
    assert_eq!(g.connections(), 2 * n as usize);
    for (i, (s, _)) in streams.iter_mut().enumerate() {
        s.write_all(format!("ping {i}").as_bytes()).unwrap();
    }
    for i in 0..n {
        g.send_data(4000 + i, 3000 + i, format!("pong {i}").as_bytes());
    }
    for (i, (_, hport)) in streams.iter().enumerate() {
        let msg = format!("ping {i}");
        assert_eq!(
            g.read_stream(2000 + len32(i), *hport, msg.len()),
            msg.as_bytes()
        );
    }
    for (i, s) in back.iter_mut().enumerate() {
        let msg = format!("pong {i}");
        assert_eq!(g.host_read(s, msg.len()), msg.as_bytes());
    }
    drop(streams);
    drop(back);
    g.until("all streams closed", |g| {
        g.inbox.retain(|p| p.hdr.op != op::SHUTDOWN);
        g.connections() == 0
    });
}

// ---- closing ------------------------------------------------------------------------------

#[test]
fn guest_half_close_then_host_close() {
    let mut g = Guest::new();
    let listener = g.listen(1029);
    let mut s = g.guest_connect(40_006, 1029, &listener);
    g.send_data(40_006, 1029, b"request");
    g.send_shutdown(40_006, 1029, shutdown::SEND);
    // The host reads the request, then EOF; it can still answer.
    assert_eq!(g.host_read_to_end(&mut s), b"request");
    g.host_write(&mut s, b"response");
    assert_eq!(g.read_stream(40_006, 1029, 8), b"response");
    drop(s);
    let p = g.recv(40_006);
    assert_eq!(p.hdr.op, op::SHUTDOWN);
    assert_ne!(p.hdr.flags & shutdown::RCV, 0);
    let p = g.recv(40_006);
    if p.hdr.op == op::SHUTDOWN {
        assert_eq!(p.hdr.flags, shutdown::BOTH);
        g.recv_op(40_006, op::RST);
    } else {
        assert_eq!(p.hdr.op, op::RST);
    }
    assert_eq!(g.connections(), 0);
}

#[test]
fn host_half_close_then_guest_close() {
    let mut g = Guest::new();
    let (mut s, hport) = g.host_connect(7000);
    s.write_all(b"query").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(g.read_stream(7000, hport, 5), b"query");
    // Only the host's sending side is closed.
    g.recv_shutdown(7000, shutdown::SEND);
    // The guest answers; the host still reads.
    g.send_data(7000, hport, b"answer");
    assert_eq!(g.host_read(&mut s, 6), b"answer");
    g.host_quiet(&mut s);
    assert_eq!(g.connections(), 1);
    // Guest closes too: nothing can flow any more; the device resets the stream and the
    // host reads EOF.
    g.send_shutdown(7000, hport, shutdown::BOTH);
    g.recv_op(7000, op::RST);
    assert!(g.host_read_to_end(&mut s).is_empty());
    assert_eq!(g.connections(), 0);
}

#[test]
fn guest_rcv_shutdown_stops_host_to_guest() {
    let mut g = Guest::new();
    let (mut s, hport) = g.host_connect(7100);
    g.send_shutdown(7100, hport, shutdown::RCV);
    // The host writer gets EPIPE; the guest still sends.
    g.until(
        "EPIPE on the host",
        |_| matches!(s.write(b"x"), Err(e) if e.kind() == ErrorKind::BrokenPipe),
    );
    g.send_data(7100, hport, b"still here");
    assert_eq!(g.host_read(&mut s, 10), b"still here");
    g.expect_quiet(7100);
}

#[test]
fn shutdown_waits_for_a_slow_host_reader_then_times_out() {
    let mut g = Guest::with_timeouts(|t| t.shutdown = Duration::from_millis(150));
    let listener = g.listen(1030);
    let mut s = g.guest_connect(40_007, 1030, &listener);
    // Fill the host socket and the device's buffer, then close both ways.
    let data = pattern(4 << 20, 12);
    let sent = g.fill_until_stalled(40_007, 1030, &data);
    g.send_shutdown(40_007, 1030, shutdown::BOTH);
    // No RST while data waits for the host (the host reads nothing yet)...
    let start = Instant::now();
    let rst = g.recv_op(40_007, op::RST);
    assert_eq!(rst.hdr.src_port, 1030);
    // ...until the shutdown timeout.
    assert!(
        start.elapsed() >= Duration::from_millis(100),
        "reset too early"
    );
    assert_eq!(g.connections(), 0);
    let got = g.host_read_to_end(&mut s);
    assert!(got.len() < sent, "the unread rest was dropped");
    assert!(got == data[..got.len()]);
}

#[test]
fn shutdown_with_buffered_data_flushes_before_the_reset() {
    let mut g = Guest::new();
    let listener = g.listen(1031);
    let mut s = g.guest_connect(40_008, 1031, &listener);
    let data = pattern(CONN_BUF_ALLOC as usize, 13);
    g.write_stream(40_008, 1031, &data, 64 << 10);
    g.send_shutdown(40_008, 1031, shutdown::BOTH);
    // The host reads everything, then EOF; the guest gets RST when it is all out.
    assert!(g.host_read_to_end(&mut s) == data);
    g.take_credit_updates(40_008);
    g.recv_op(40_008, op::RST);
    assert_eq!(g.connections(), 0);
}

#[test]
fn reset_closes_streams_and_the_device_starts_again() {
    let mut g = Guest::new();
    let (mut s, _) = g.host_connect(8000);
    g.drv.write32(regs::STATUS, 0);
    assert!(g.host_read_to_end(&mut s).is_empty());
    assert_eq!(g.connections(), 0);
    // Bring it back (fresh rings) and connect again.
    g.drv.activate(bit(VIRTIO_F_VERSION_1), QSIZE);
    g.rx_posted.clear();
    g.rx_free = (0..RX_BUFS)
        .map(|_| (g.drv.alloc(HEADER_LEN as u64), g.drv.alloc(RX_DATA.into())))
        .collect();
    g.flows.clear();
    g.post_rx();
    let (mut s, hport) = g.host_connect(8001);
    g.send_data(8001, hport, b"again");
    assert_eq!(g.host_read(&mut s, 5), b"again");
}

// ---- hostile guest ------------------------------------------------------------------------

#[test]
fn hostile_bad_type_unknown_op_and_payload_on_control_get_rst() {
    let mut g = Guest::new();
    let mut h = g.hdr(op::REQUEST, 50, 1111);
    h.type_ = 2; // SEQPACKET
    g.send(h, &[]);
    g.recv_op(50, op::RST);

    let h = g.hdr(9, 51, 1111);
    g.send(h, &[]);
    g.recv_op(51, op::RST);
    let h = g.hdr(0, 52, 1111);
    g.send(h, &[]);
    g.recv_op(52, op::RST);

    // On a live stream: the stream is reset.
    let (mut s, hport) = g.host_connect(53);
    let mut h = g.hdr(op::CREDIT_UPDATE, 53, hport);
    h.len = 4;
    g.send(h, b"junk");
    g.recv_op(53, op::RST);
    assert!(g.host_read_to_end(&mut s).is_empty());
    // Orphan packets other than REQUEST and RST are answered with RST; RST is not.
    g.send_op(op::RW, 54, 1111);
    g.recv_op(54, op::RST);
    g.send_op(op::RST, 55, 1111);
    g.expect_quiet(55);
    assert_eq!(g.connections(), 0);
}

#[test]
fn hostile_foreign_cids_are_dropped() {
    let mut g = Guest::new();
    let listener = g.listen(1032);
    let mut h = g.hdr(op::REQUEST, 60, 1032);
    h.src_cid = 99;
    g.send(h, &[]);
    let mut h = g.hdr(op::REQUEST, 61, 1032);
    h.dst_cid = 7;
    g.send(h, &[]);
    let mut h = g.hdr(op::REQUEST, 62, 1032);
    h.src_cid = u64::MAX;
    g.send(h, &[]);
    g.expect_quiet(60);
    g.expect_quiet(61);
    g.expect_quiet(62);
    assert!(listener.accept().is_err(), "nobody connected");
    assert_eq!(g.connections(), 0);
}

#[test]
fn hostile_malformed_tx_chains_are_dropped() {
    let mut g = Guest::new();
    let (mut s, hport) = g.host_connect(70);
    let hdr_addr = g.drv.alloc(HEADER_LEN as u64);
    let data_addr = g.drv.alloc(1 << 16);

    // Header in a too-short descriptor.
    let h = g.hdr(op::REQUEST, 71, 1111);
    g.drv.write_mem(hdr_addr, &h.to_bytes());
    assert_eq!(g.send_chain(&[(hdr_addr, 20, false)]).1, 0);
    // Device-writable header.
    g.send_chain(&[(hdr_addr, HEADER_LEN_U32, true)]);
    // Header outside guest memory.
    g.send_chain(&[(GuestAddress(MEM as u64 + 0x1000), HEADER_LEN_U32, false)]);
    g.expect_quiet(71);
    // A payload bigger than the packet size limit: the header is readable, so the stream
    // it names hears RST.
    let mut h = g.hdr(op::RW, 71, 1111);
    h.len = MAX_PKT_DATA + 1;
    g.drv.write_mem(hdr_addr, &h.to_bytes());
    g.send_chain(&[(hdr_addr, 44, false), (data_addr, MAX_PKT_DATA + 1, false)]);
    g.recv_op(71, op::RST);

    // RW on the live stream with `len` beyond its data descriptor: the stream is reset.
    let mut h = g.hdr(op::RW, 70, hport);
    h.len = 2048;
    g.drv.write_mem(hdr_addr, &h.to_bytes());
    g.send_chain(&[(hdr_addr, 44, false), (data_addr, 1024, false)]);
    g.recv_op(70, op::RST);
    assert!(
        g.host_read_to_end(&mut s).is_empty(),
        "no partial data reached the host"
    );
    // Device-writable data descriptor on a new stream: reset too.
    let (mut s, hport) = g.host_connect(72);
    let mut h = g.hdr(op::RW, 72, hport);
    h.len = 16;
    g.drv.write_mem(hdr_addr, &h.to_bytes());
    g.send_chain(&[(hdr_addr, 44, false), (data_addr, 16, true)]);
    g.recv_op(72, op::RST);
    assert!(g.host_read_to_end(&mut s).is_empty());
    // Data outside guest memory.
    let (mut s, hport) = g.host_connect(73);
    let mut h = g.hdr(op::RW, 73, hport);
    h.len = 16;
    g.drv.write_mem(hdr_addr, &h.to_bytes());
    g.send_chain(&[
        (hdr_addr, 44, false),
        (GuestAddress(MEM as u64 - 8), 16, false),
    ]);
    g.recv_op(73, op::RST);
    assert!(g.host_read_to_end(&mut s).is_empty());

    // Header and payload in one descriptor (Linux 6.2+) is fine.
    let (mut s, hport) = g.host_connect(74);
    let mut h = g.hdr(op::RW, 74, hport);
    h.len = 5;
    let mut one = h.to_bytes().to_vec();
    one.extend_from_slice(b"hello");
    g.drv.write_mem(data_addr, &one);
    g.send_chain(&[(data_addr, len32(one.len()), false)]);
    assert_eq!(g.host_read(&mut s, 5), b"hello");

    // A chain whose descriptors loop: only what a packet needs is read, and the chain
    // comes back.
    let h = g.hdr(op::CREDIT_UPDATE, 74, hport);
    g.drv.write_mem(hdr_addr, &h.to_bytes());
    let head = g.drv.queues[TXQ].add_chain(&g.drv.mem, &[(hdr_addr, 44, false)]);
    let next = (head + 1) % QSIZE;
    g.drv.queues[TXQ].store_raw(
        &g.drv.mem,
        head,
        &[
            Descriptor::new(hdr_addr.0, 44, 1, next),
            Descriptor::new(hdr_addr.0, 44, 1, head),
        ],
    );
    g.drv.kick_queue(TXQ);
    g.drv.wait_used(TXQ, 1, WAIT);
    g.send_data(74, hport, b" again");
    assert_eq!(g.host_read(&mut s, 6), b" again");
    assert!(!g.needs_reset());
}

#[test]
fn hostile_rx_buffers_are_returned_empty() {
    let mut g = Guest::build(Timeouts::default(), bit(VIRTIO_F_VERSION_1), 0);
    let h = g.drv.alloc(64);
    let d = g.drv.alloc(4096);
    // Read-only, header descriptor too short, header only, outside memory, no data room.
    let bad: Vec<Vec<Buf>> = vec![
        vec![(h, 44, false), (d, 4096, false)],
        vec![(h, 20, true), (d, 4096, true)],
        vec![(h, 44, true)],
        vec![(GuestAddress(MEM as u64), 44, true), (d, 4096, true)],
        vec![(h, 44, true), (d, 0, true)],
        vec![(h, 44, true), (d, MAX_PKT_DATA + 1, true)],
    ];
    for b in &bad {
        g.drv.queues[RXQ].add_chain(&g.drv.mem, b);
    }
    // The device has something to say (a REQUEST) and finds only bad buffers.
    let mut s = g.client(b"CONNECT 80\n");
    let used = g.drv.wait_used(RXQ, bad.len(), WAIT);
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
    // Good buffers: the REQUEST is delivered and the stream works.
    g.rx_free = (0..4)
        .map(|_| (g.drv.alloc(HEADER_LEN as u64), g.drv.alloc(RX_DATA.into())))
        .collect();
    g.post_rx();
    let req = g.recv_op(80, op::REQUEST);
    g.send_op(op::RESPONSE, 80, req.hdr.src_port);
    let ok = format!("OK {}\n", req.hdr.src_port);
    assert_eq!(g.host_read(&mut s, ok.len()), ok.as_bytes());
    assert!(!g.needs_reset());
}

#[test]
fn hostile_lying_available_index_needs_reset() {
    let mut g = Guest::new();
    let q = g.drv.queues[TXQ].clone();
    q.set_avail_idx(&g.drv.mem, QSIZE + 5);
    g.drv.kick_queue(TXQ);
    g.until("needs reset", |g| g.needs_reset());
    assert_ne!(g.drv.status() & DEVICE_NEEDS_RESET, 0);
}

impl Guest {
    fn needs_reset(&mut self) -> bool {
        self.drv.status() & DEVICE_NEEDS_RESET != 0
    }
}

// ---- snapshots ---------------------------------------------------------------------------

#[test]
fn restore_keeps_the_queues_drops_the_streams_and_sends_a_transport_reset() {
    let mut g = Guest::new();
    // Linux posts event buffers at probe.
    let ev = g.drv.alloc(4);
    g.drv.write_mem(ev, &[0xff; 4]);
    g.drv.queues[EVQ].add_chain(&g.drv.mem, &[(ev, 4, true)]);
    let (mut s, hport) = g.host_connect(1234);
    let up = pattern(3000, 4);
    g.host_write(&mut s, &up);
    assert_eq!(g.read_stream(1234, hport, up.len()), up);

    let saved = g.drv.transport.save();
    assert_eq!(saved.in_flight(), None);
    let json = serde_json::to_string(&saved).unwrap();
    let loaded: MmioPersist = serde_json::from_str(&json).unwrap();
    assert_eq!(loaded, saved);

    // The clone: its own socket, no streams; the guest hears a transport reset.
    let uds = g._dir.as_path().join("clone.sock");
    let dev = Vsock::new(CID, &uds).unwrap();
    let handler = dev.handler();
    let mut restored = g.drv.restore(Box::new(dev), &loaded).unwrap();
    assert_eq!(restored.queues[EVQ].take_used(&restored.mem), vec![(0, 4)]);
    assert_eq!(
        restored.read_mem(ev, 4),
        [0; 4],
        "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );
    assert!(restored.take_irqs() >= 1);
    let mut expected = saved.clone();
    let DeviceState::Vsock(v) = &mut expected.device else {
        unreachable!()
    };
    v.uds_path = uds.clone();
    let evq = &mut v.queues.as_mut().unwrap()[EVQ];
    evq.next_avail += 1;
    evq.next_used += 1;
    assert_eq!(restored.transport.save(), expected);

    // The guest goes on: a host client of the clone reaches it.
    g.drv = restored;
    g.handler = handler;
    g.uds = uds;
    g.flows.clear();
    assert_eq!(g.connections(), 0);
    let (mut s, hport) = g.host_connect(1234);
    g.host_write(&mut s, &up);
    assert_eq!(g.read_stream(1234, hport, up.len()), up);

    // Another guest CID is refused.
    let other = Vsock::new(CID + 1, g._dir.as_path().join("other.sock")).unwrap();
    let err = g.drv.restore(Box::new(other), &loaded).err().unwrap();
    assert!(err.to_string().contains("guest CID"), "{err}");
}

#[test]
fn single_descriptor_rx_buffers_carry_a_multi_packet_message_intact() {
    // As Linux ≥ 6.2 (and Debian's 6.1) posts them; a ttrpc request of 12 KB spans four.
    let mut g = Guest::build(Timeouts::default(), bit(VIRTIO_F_VERSION_1), 0);
    g.single_rx_desc = true;
    g.rx_free = (0..RX_BUFS)
        .map(|_| {
            let h = g.drv.alloc(HEADER_LEN as u64 + u64::from(SINGLE_RX_DATA));
            (h, h.unchecked_add(HEADER_LEN as u64))
        })
        .collect();
    g.post_rx();
    let (mut s, hport) = g.host_connect(1024);
    let header = pattern(10, 1);
    let body = pattern(12_174, 2);
    g.host_write(&mut s, &header);
    g.host_write(&mut s, &body);
    let got = g.read_stream(1024, hport, header.len() + body.len());
    assert!(got[..10] == header[..], "header differs");
    assert!(got[10..] == body[..], "body differs");
}
