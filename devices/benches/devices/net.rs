//! virtio-net on a real tap in a network namespace of the bench's own (root only; without
//! root the row is skipped with a message). Frames carry IEEE's experimental EtherType, so
//! the host stack drops what the guest sends at once (no protocol handler), and nothing
//! else uses the tap. One frame in flight; sizes are whole Ethernet frames: 1514 bytes
//! (MTU 1500) and 64000 bytes (the tap's MTU is raised for it; no offloads negotiated).
//!
//! * write (guest → host): the driver puts a TX chain (12-byte header, frame) on the queue
//!   and waits for it to be used; the device `writev`s it to the tap. Baseline: the same
//!   `writev` of header and frame on a second tap's fd.
//! * read (host → guest): an `AF_PACKET` socket sends the frame out of the tap, the device
//!   reads it into the one posted receive buffer and the driver waits for it. Baseline: the
//!   same send on the second tap and a `readv` of its fd into a heap buffer.
//!
//! An `AF_PACKET` socket is bound to each tap (the device's and the baseline's), so both
//! sides pay the same for it.

use std::os::fd::AsRawFd;

use devices::virtio::const_u32;
use devices::virtio::features::{bit, VIRTIO_F_VERSION_1};
use devices::virtio::net::test_net::{ether_frame, link_up, set_mtu, PacketSocket};
use devices::virtio::net::{Net, NetConfig, Tap, TapSource};
use devices::virtio::test_utils::{len32, MmioDriver};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU};
use vm_memory::GuestAddress;

use super::{Dir, Subject, TIMEOUT};

/// Frame sizes measured (Ethernet header included).
pub const SIZES: [usize; 2] = [1514, 64000];
const MTU: u16 = 64000 - 14;
const HDR: usize = 12;
const ETHERTYPE: u16 = 0x88b5;
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];
const RXQ: usize = 0;
const TXQ: usize = 1;
const MEM: usize = 4 << 20;
const QSIZE: u16 = 256;
/// A receive buffer: header and the largest frame the device may deliver.
const RX_BUF: u32 = const_u32((HDR + MTU as usize + 14 + 4) as u64);

fn frame(size: usize) -> Vec<u8> {
    ether_frame(MAC, ETHERTYPE, &vec![0x5a; size - 14])
}

/// The device on tap `pvbench0` and its driver.
pub struct NetDevice {
    drv: MmioDriver,
    tx: GuestAddress,
    rx: GuestAddress,
    host: PacketSocket,
}

/// The baseline: tap `pvbench1` used directly.
pub struct RawTap {
    tap: Tap,
    host: PacketSocket,
    buf: Vec<u8>,
}

fn tap_up(name: &str) {
    set_mtu(name, MTU.into());
    link_up(name);
}

/// Both sides; must run inside the bench's network namespace.
pub fn setup() -> (NetDevice, RawTap) {
    let net = Net::new(&NetConfig {
        tap: TapSource::Name("pvbench0".into()),
        mac: Some(MAC),
        mtu: Some(MTU),
    })
    .expect("virtio-net device");
    tap_up("pvbench0");
    let mut drv = MmioDriver::new(Box::new(net), MEM);
    drv.activate(
        bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_MTU),
        QSIZE,
    );
    let tx = drv.alloc((HDR + SIZES[1]) as u64);
    let rx = drv.alloc(u64::from(RX_BUF));
    let dev = NetDevice {
        drv,
        tx,
        rx,
        host: PacketSocket::bind("pvbench0"),
    };
    let tap = Tap::open(&TapSource::Name("pvbench1".into())).expect("baseline tap");
    tap_up("pvbench1");
    let raw = RawTap {
        tap,
        host: PacketSocket::bind("pvbench1"),
        buf: vec![0; RX_BUF as usize],
    };
    (dev, raw)
}

impl Subject for NetDevice {
    fn cell(&mut self, dir: Dir, size: usize) -> Box<dyn FnMut(u64) + '_> {
        let f = frame(size);
        match dir {
            Dir::Write => {
                self.drv.write_mem(self.tx, &[0; HDR]);
                self.drv.write_mem(GuestAddress(self.tx.0 + HDR as u64), &f);
                let chain = [(self.tx, len32(HDR + size), false)];
                Box::new(move |n| {
                    for _ in 0..n {
                        self.drv.submit(TXQ, &chain);
                        self.drv.wait_used(TXQ, 1, TIMEOUT);
                    }
                })
            }
            Dir::Read => {
                let chain = [(self.rx, RX_BUF, true)];
                Box::new(move |n| {
                    for _ in 0..n {
                        self.drv.submit(RXQ, &chain);
                        self.host.send(&f);
                        let used = self.drv.wait_used(RXQ, 1, TIMEOUT);
                        assert_eq!(used[0].1 as usize, HDR + size, "frame delivered whole");
                    }
                })
            }
        }
    }
}

impl Subject for RawTap {
    fn cell(&mut self, dir: Dir, size: usize) -> Box<dyn FnMut(u64) + '_> {
        let f = frame(size);
        let hdr = [0u8; HDR];
        match dir {
            Dir::Write => Box::new(move |n| {
                let iovs = [
                    libc::iovec {
                        iov_base: hdr.as_ptr() as *mut _,
                        iov_len: HDR,
                    },
                    libc::iovec {
                        iov_base: f.as_ptr() as *mut _,
                        iov_len: f.len(),
                    },
                ];
                for _ in 0..n {
                    self.tap.writev(&iovs).expect("baseline writev");
                }
            }),
            Dir::Read => Box::new(move |n| {
                for _ in 0..n {
                    self.host.send(&f);
                    let iov = [libc::iovec {
                        iov_base: self.buf.as_mut_ptr().cast(),
                        iov_len: self.buf.len(),
                    }];
                    let got = loop {
                        match self.tap.readv(&iov) {
                            Ok(got) => break got,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                wait_readable(self.tap.as_raw_fd())
                            }
                            Err(e) => panic!("baseline readv: {e}"),
                        }
                    };
                    assert_eq!(got, HDR + size, "frame read whole");
                }
            }),
        }
    }
}

/// Sleeps in `poll` until `fd` is readable (the baseline's non-blocking tap).
fn wait_readable(fd: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let rc = unsafe {
        libc::poll(
            &mut pfd,
            1,
            i32::try_from(TIMEOUT.as_millis()).unwrap_or(i32::MAX),
        )
    };
    assert_eq!(rc, 1, "baseline tap: no frame within {TIMEOUT:?}");
}
