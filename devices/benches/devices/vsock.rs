//! virtio-vsock: one stream opened from the host through the VM's Unix socket, with the
//! driver playing Linux 6.1's vsock driver (a full RX queue of 4 KiB buffers, 256 KiB of
//! credit handed back when less than 64 KiB is left, packets of at most 64 KiB, one kick
//! per chunk) and a [`Peer`] thread as the host application.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use devices::virtio::features::{bit, VIRTIO_F_VERSION_1};
use devices::virtio::test_utils::MmioDriver;
use devices::virtio::vsock::packet::{
    op, Header, HEADER_LEN, HEADER_LEN_U32, HOST_CID, TYPE_STREAM,
};
use devices::virtio::vsock::{Vsock, MAX_PKT_DATA, QUEUE_SIZE, RXQ, TXQ};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use super::file::pattern;
use super::{Dir, Subject, TIMEOUT};

const CID: u64 = 3;
const GUEST_PORT: u32 = 5000;
const MEM: usize = 8 << 20;
/// Linux 6.1's `VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE`.
const RX_DATA: u32 = 4096;
/// Linux's default vsock buffer size: the credit the guest gives.
const GUEST_BUF_ALLOC: u32 = 256 << 10;
/// Chains of two descriptors fill a queue.
const CHAINS: usize = QUEUE_SIZE as usize / 2;
/// Where a receive buffer's data starts after its header.
const RX_DATA_AT: u64 = 64;

/// What the peer does next: the opposite of the guest's `dir`, `n` chunks of `size` bytes.
struct Job {
    dir: Dir,
    size: usize,
    n: u64,
}

/// The host application on one end of a Unix stream, on its own thread with blocking I/O.
struct Peer {
    jobs: Option<Sender<Job>>,
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl Peer {
    fn spawn(mut stream: UnixStream) -> Peer {
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let thread = thread::spawn(move || {
            let mut buf = pattern(1 << 20);
            for job in job_rx {
                let buf = &mut buf[..job.size];
                for _ in 0..job.n {
                    match job.dir {
                        Dir::Read => stream.write_all(buf),
                        Dir::Write => stream.read_exact(buf),
                    }
                    .expect("peer socket I/O");
                }
                if done_tx.send(()).is_err() {
                    return;
                }
            }
        });
        Peer {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        }
    }

    fn start(&self, dir: Dir, size: usize, n: u64) {
        let jobs = self.jobs.as_ref().expect("peer running");
        jobs.send(Job { dir, size, n }).expect("peer thread died");
    }

    /// Waits for the current job to finish.
    fn wait(&self) {
        self.done.recv().expect("peer thread died");
    }

    /// Whether the current job is done.
    fn finished(&self) -> bool {
        match self.done.try_recv() {
            Ok(()) => true,
            Err(TryRecvError::Empty) => false,
            Err(TryRecvError::Disconnected) => panic!("peer thread died"),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The baseline: a Unix socket pair, this thread on one end, the peer on the other.
pub struct RawSocket {
    local: UnixStream,
    peer: Peer,
    buf: Vec<u8>,
}

impl Subject for RawSocket {
    fn cell(&mut self, dir: Dir, size: usize) -> Box<dyn FnMut(u64) + '_> {
        Box::new(move |n| {
            self.peer.start(dir, size, n);
            let buf = &mut self.buf[..size];
            for _ in 0..n {
                match dir {
                    Dir::Read => self.local.read_exact(buf),
                    Dir::Write => self.local.write_all(buf),
                }
                .expect("socket pair I/O");
            }
            self.peer.wait();
        })
    }
}

/// The guest's vsock driver with one stream, over the MMIO test driver.
struct Guest {
    drv: MmioDriver,
    /// The stream's host port, once the host's REQUEST arrived.
    hport: Option<u32>,
    /// Posted receive buffers by head index, and free ones.
    rx_posted: HashMap<u16, GuestAddress>,
    rx_free: Vec<GuestAddress>,
    /// [`CHAINS`] header slots for TX chains in flight (used in order), and the next one.
    tx_hdrs: GuestAddress,
    tx_seq: usize,
    tx_in_flight: usize,
    tx_unkicked: bool,
    /// 1 MiB of payload to send from.
    data: GuestAddress,
    /// Stream bytes received (and consumed at once).
    fwd_cnt: u32,
    fwd_cnt_told: u32,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// A control packet owed to the device.
    owed: Option<u16>,
}

impl Guest {
    fn new(mut drv: MmioDriver) -> Guest {
        drv.activate(bit(VIRTIO_F_VERSION_1), QUEUE_SIZE);
        let rx_free = (0..CHAINS)
            .map(|_| drv.alloc(RX_DATA_AT + u64::from(RX_DATA)))
            .collect();
        let tx_hdrs = drv.alloc((CHAINS * HEADER_LEN) as u64);
        let data = drv.alloc(1 << 20);
        drv.write_mem(data, &pattern(1 << 20));
        let mut g = Guest {
            drv,
            hport: None,
            rx_posted: HashMap::new(),
            rx_free,
            tx_hdrs,
            tx_seq: 0,
            tx_in_flight: 0,
            tx_unkicked: false,
            data,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            owed: None,
        };
        g.post_rx();
        g
    }

    /// Runs the device for one event-loop turn (waiting up to `ms`), then handles what it
    /// returned: TX chains, received packets, control packets owed, RX buffers to re-post.
    fn pump(&mut self, ms: i32) {
        self.kick_tx();
        self.drv.run_events(ms);
        self.reap_tx();
        for (id, _) in self.drv.queues[RXQ].take_used(&self.drv.mem) {
            let slot = self
                .rx_posted
                .remove(&u16::try_from(id).unwrap())
                .expect("posted rx buffer");
            let mut b = [0u8; HEADER_LEN];
            self.drv.mem.read_slice(&mut b, slot).expect("rx header");
            self.on_packet(Header::from_bytes(&b).expect("rx header"));
            self.rx_free.push(slot);
        }
        let free = GUEST_BUF_ALLOC - self.fwd_cnt.wrapping_sub(self.fwd_cnt_told);
        if free < MAX_PKT_DATA && self.hport.is_some() {
            self.owed.get_or_insert(op::CREDIT_UPDATE);
        }
        if let Some(op) = self.owed.take() {
            self.add_packet(op, None);
        }
        self.post_rx();
    }

    fn on_packet(&mut self, h: Header) {
        assert_eq!(h.dst_port, GUEST_PORT, "packet for another port: {h:?}");
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            op::REQUEST => {
                self.hport = Some(h.src_port);
                self.owed = Some(op::RESPONSE);
            }
            op::RW => self.fwd_cnt = self.fwd_cnt.wrapping_add(h.len),
            op::CREDIT_REQUEST => self.owed = Some(op::CREDIT_UPDATE),
            op::CREDIT_UPDATE => {}
            _ => panic!("unexpected packet {h:?}"),
        }
    }

    fn post_rx(&mut self) {
        if self.rx_free.is_empty() {
            return;
        }
        for slot in std::mem::take(&mut self.rx_free) {
            let data = GuestAddress(slot.0 + RX_DATA_AT);
            let bufs = [(slot, HEADER_LEN_U32, true), (data, RX_DATA, true)];
            let head = self.drv.queues[RXQ].add_chain(&self.drv.mem, &bufs);
            self.rx_posted.insert(head, slot);
        }
        self.drv.kick_queue(RXQ);
    }

    fn reap_tx(&mut self) {
        self.tx_in_flight -= self.drv.queues[TXQ].take_used(&self.drv.mem).len();
    }

    fn kick_tx(&mut self) {
        if std::mem::take(&mut self.tx_unkicked) {
            self.drv.kick_queue(TXQ);
        }
    }

    /// Bytes the device can take now.
    fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Queues a packet on TX (kicked at the next [`Guest::pump`] or [`Guest::kick_tx`]);
    /// `data` is a payload at (offset in the data buffer, length).
    fn add_packet(&mut self, op: u16, data: Option<(u64, u32)>) {
        while self.tx_in_flight == CHAINS {
            self.kick_tx();
            self.drv.run_events(1);
            self.reap_tx();
        }
        let hport = self.hport.expect("stream open");
        let len = data.map_or(0, |(_, len)| len);
        let h = Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: GUEST_PORT,
            dst_port: hport,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        };
        let slot = GuestAddress(self.tx_hdrs.0 + (self.tx_seq % CHAINS * HEADER_LEN) as u64);
        self.drv.write_mem(slot, &h.to_bytes());
        let hdr = (slot, HEADER_LEN_U32, false);
        match data {
            Some((off, len)) => {
                let payload = (GuestAddress(self.data.0 + off), len, false);
                self.drv.queues[TXQ].add_chain(&self.drv.mem, &[hdr, payload]);
            }
            None => {
                self.drv.queues[TXQ].add_chain(&self.drv.mem, &[hdr]);
            }
        };
        self.tx_seq += 1;
        self.tx_in_flight += 1;
        self.tx_unkicked = true;
        self.tx_cnt = self.tx_cnt.wrapping_add(len);
        self.fwd_cnt_told = self.fwd_cnt;
    }

    /// Sends one `size`-byte chunk in packets within the device's credit, and kicks.
    fn send(&mut self, size: usize) {
        let mut off = 0;
        let start = Instant::now();
        while off < size {
            let credit = self.credit();
            if credit == 0 {
                assert!(start.elapsed() < TIMEOUT, "no credit from the device");
                self.pump(10);
                continue;
            }
            let len = credit
                .min(MAX_PKT_DATA)
                .min(u32::try_from(size - off).unwrap_or(u32::MAX));
            self.add_packet(op::RW, Some((off as u64, len)));
            off += len as usize;
        }
        self.kick_tx();
    }

    /// Runs the device until `total` more stream bytes arrived.
    fn receive(&mut self, total: u64) {
        let mut left = total;
        let start = Instant::now();
        while left > 0 {
            assert!(start.elapsed() < TIMEOUT, "{left} of {total} bytes missing");
            let before = self.fwd_cnt;
            self.pump(10);
            left -= u64::from(self.fwd_cnt.wrapping_sub(before)).min(left);
        }
    }
}

/// The device, its guest driver and the host application on the stream.
pub struct VsockDevice {
    guest: Guest,
    peer: Peer,
    _dir: TempDir,
}

impl Subject for VsockDevice {
    fn cell(&mut self, dir: Dir, size: usize) -> Box<dyn FnMut(u64) + '_> {
        Box::new(move |n| {
            self.peer.start(dir, size, n);
            match dir {
                Dir::Read => {
                    self.guest.receive(n * size as u64);
                    self.peer.wait();
                }
                Dir::Write => {
                    (0..n).for_each(|_| self.guest.send(size));
                    // The device may still hold data for the peer: keep it running.
                    let start = Instant::now();
                    while !self.peer.finished() {
                        assert!(start.elapsed() < TIMEOUT, "the peer did not finish");
                        self.guest.pump(1);
                    }
                }
            }
        })
    }
}

/// The device with a stream opened from the host, and the socket-pair baseline.
pub fn setup() -> (VsockDevice, RawSocket) {
    let dir = TempDir::new().expect("temp dir");
    let uds = dir.as_path().join("vsock.sock");
    let dev = Vsock::new(CID, &uds).expect("virtio-vsock device");
    let mut guest = Guest::new(MmioDriver::new(Box::new(dev), MEM));

    let mut host = UnixStream::connect(&uds).expect("connect to the VM socket");
    host.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
        .expect("CONNECT line");
    host.set_nonblocking(true).expect("non-blocking");
    let mut line = Vec::new();
    let start = Instant::now();
    while !line.ends_with(b"\n") {
        assert!(start.elapsed() < TIMEOUT, "no answer to CONNECT");
        guest.pump(1);
        let mut b = [0u8; 1];
        match host.read(&mut b) {
            Ok(1) => line.push(b[0]),
            Ok(_) => panic!("the device closed the stream"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("reading the CONNECT answer: {e}"),
        }
    }
    assert!(line.starts_with(b"OK "), "CONNECT answered {line:?}");
    host.set_nonblocking(false).expect("blocking");

    let (local, remote) = UnixStream::pair().expect("socket pair");
    let dev = VsockDevice {
        guest,
        peer: Peer::spawn(host),
        _dir: dir,
    };
    let raw = RawSocket {
        local,
        peer: Peer::spawn(remote),
        buf: pattern(1 << 20),
    };
    (dev, raw)
}
