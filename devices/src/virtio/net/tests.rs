//! virtio-net driven end to end through the virtio-mmio transport by the host-side test
//! driver (playing the guest's virtio-net driver) against a REAL tap, in a network
//! namespace each test makes for itself ([`in_new_netns`]: the namespace, its taps and
//! sockets disappear when the test ends, also on failure). The host side of the wire is an
//! `AF_PACKET` socket on the tap, or a UDP socket on the tap's address.
//!
//! Needs root and /dev/net/tun; without them each test says SKIP on stderr and passes.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestAddress;

use super::header::{NetHdr, F_NEEDS_CSUM};
use super::test_net::*;
use super::*;
use crate::virtio::features::{bit, VIRTIO_F_VERSION_1};
use crate::virtio::mmio::regs;
use crate::virtio::status::DEVICE_NEEDS_RESET;
use crate::virtio::test_utils::{len32, MmioDriver, DESC_NEXT};
use crate::virtio::{lock, DeviceState, PersistError};

const TAP: &str = "pvt0";
const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(200);
const MEM: usize = 16 << 20;
const QSIZE: u16 = 256;
/// IEEE's "local experimental" EtherType: nothing else on the tap uses it.
const ETHERTYPE: u16 = 0x88b5;
const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

const GUEST_OFFLOADS: u64 = (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6);

/// Runs `f` in a fresh network namespace, or says SKIP without root.
fn netns_test(name: &str, f: impl FnOnce() + Send + 'static) {
    if !can_make_taps() {
        eprintln!("SKIP {name}: needs root and /dev/net/tun");
        return;
    }
    in_new_netns(f);
}

/// The guest's virtio-net driver over the MMIO test driver, with the host end of the tap.
struct Guest {
    drv: MmioDriver,
    handler: Arc<Mutex<NetHandler>>,
    host: PacketSocket,
    features: u64,
    /// Receive chains posted and not used yet: (head, address, size), in ring order.
    rx_posted: VecDeque<(u16, GuestAddress, u32)>,
}

/// A NIC on tap `name` (created here) with `cfg_mtu`, negotiated with `wanted` ∩ offered.
fn guest_on(name: &str, mtu: Option<u16>, wanted: u64) -> Guest {
    let net = Net::new(&NetConfig {
        tap: TapSource::Name(name.into()),
        mac: Some(MAC),
        mtu,
    })
    .expect("net device");
    if let Some(m) = mtu {
        set_mtu(name, m.into());
    }
    link_up(name);
    let handler = net.handler();
    let mut drv = MmioDriver::new(Box::new(net), MEM);
    let features = drv.activate(wanted, QSIZE);
    Guest {
        drv,
        handler,
        host: PacketSocket::bind(name),
        features,
        rx_posted: VecDeque::new(),
    }
}

fn guest(mtu: Option<u16>, wanted: u64) -> Guest {
    guest_on(TAP, mtu, wanted)
}

impl Guest {
    /// Puts one transmit chain (`bufs` of data, readable or not) on the TX queue and
    /// returns its used entry.
    fn transmit_chain(&mut self, pieces: &[(&[u8], bool)]) -> (u32, u32) {
        let bufs: Vec<_> = pieces
            .iter()
            .map(|(data, writable)| {
                let addr = self.drv.alloc(data.len() as u64);
                self.drv.write_mem(addr, data);
                (addr, len32(data.len()), *writable)
            })
            .collect();
        let head = self.drv.submit(TXQ, &bufs);
        let used = self.drv.wait_used(TXQ, 1, WAIT);
        assert_eq!(
            used,
            vec![(u32::from(head), 0)],
            "tx chains are used with length 0"
        );
        used[0]
    }

    /// Sends `frame` with `hdr` from the guest (header and frame in separate descriptors,
    /// as Linux does without `any_header_sg`).
    fn transmit(&mut self, hdr: NetHdr, frame: &[u8]) {
        self.transmit_chain(&[(&hdr.to_bytes(), false), (frame, false)]);
    }

    /// Posts `count` receive buffers of `size` bytes and kicks the RX queue.
    fn post_rx(&mut self, count: usize, size: u32) {
        for _ in 0..count {
            let addr = self.drv.alloc(size.into());
            let head = self.drv.queues[RXQ].add_chain(&self.drv.mem, &[(addr, size, true)]);
            self.rx_posted.push_back((head, addr, size));
        }
        self.drv.kick_queue(RXQ);
    }

    /// Waits for the next received frame: its header and the bytes after it, and the used
    /// lengths of the buffers it took.
    fn receive(&mut self) -> (NetHdr, Vec<u8>, Vec<u32>) {
        let mut used = self.drv.wait_used(RXQ, 1, WAIT);
        let (head, len) = used.remove(0);
        let (h, addr, _) = self.rx_posted.pop_front().expect("a posted buffer");
        assert_eq!(head, u32::from(h), "buffers are used in ring order");
        let mut bytes = self.drv.read_mem(addr, len as usize);
        let mut raw = [0u8; HDR_LEN];
        raw.copy_from_slice(&bytes[..HDR_LEN]);
        let hdr = NetHdr::parse(&raw);
        let mut lens = vec![len];
        if hdr.num_buffers > 1 {
            let mut rest = used;
            let more = usize::from(hdr.num_buffers) - 1;
            if rest.len() < more {
                rest.extend(self.drv.wait_used(RXQ, more - rest.len(), WAIT));
            }
            assert_eq!(rest.len(), more, "exactly num_buffers buffers");
            for (head, len) in rest {
                let (h, addr, _) = self.rx_posted.pop_front().expect("a posted buffer");
                assert_eq!(head, u32::from(h), "buffers are used in ring order");
                bytes.extend(self.drv.read_mem(addr, len as usize));
                lens.push(len);
            }
        } else {
            assert!(used.is_empty(), "one frame at a time: {used:?}");
        }
        (hdr, bytes[HDR_LEN..].to_vec(), lens)
    }

    fn stats(&self) -> NetStats {
        lock(&self.handler).stats()
    }

    fn needs_reset(&mut self) -> bool {
        self.drv.status() & DEVICE_NEEDS_RESET != 0
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let payload: Vec<u8> = (0..len - 14)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(7) ^ seed)
        .collect();
    ether_frame(MAC, ETHERTYPE, &payload)
}

#[test]
fn frames_go_both_ways_through_a_real_tap() {
    netns_test("frames_go_both_ways_through_a_real_tap", || {
        let mut g = guest(None, u64::MAX);
        for f in [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
        ] {
            assert!(g.features & bit(f) != 0, "feature {f} negotiated");
        }
        // Config space: MAC, link up, one queue pair, MTU.
        let config = g.drv.read_config(0, 12);
        assert_eq!(config[..6], MAC);
        assert_eq!(config[6..8], [1, 0], "VIRTIO_NET_S_LINK_UP");
        assert_eq!(config[10..12], 1500u16.to_le_bytes());

        // Guest → host.
        let out = frame(60, 1);
        g.transmit(NetHdr::default(), &out);
        assert_eq!(g.host.recv(ETHERTYPE, WAIT).as_deref(), Some(&out[..]));

        // Host → guest. With guest TSO a frame may be 64 KiB: the device waits for that much
        // room (Linux posts the whole ring, 256 buffers of 1.5 KiB and up).
        g.post_rx(40, 2048);
        let back = frame(200, 2);
        g.host.send(&back);
        let (hdr, data, lens) = g.receive();
        assert_eq!(hdr.num_buffers, 1);
        assert_eq!(data, back);
        assert_eq!(lens, vec![len32(HDR_LEN + back.len())]);
        let s = g.stats();
        assert_eq!(
            (s.tx_frames, s.rx_frames, s.tx_dropped, s.rx_dropped),
            (1, 1, 0, 0)
        );
        assert!(!g.needs_reset());
    });
}

#[test]
fn a_large_frame_spans_mergeable_buffers() {
    netns_test("a_large_frame_spans_mergeable_buffers", || {
        // MTU 4000 and no guest TSO: the device needs 4030 bytes of buffers per frame.
        let mut g = guest(Some(4000), !GUEST_OFFLOADS);
        g.post_rx(8, 1024);
        let big = frame(3000, 3);
        g.host.send(&big);
        let (hdr, data, lens) = g.receive();
        assert_eq!(hdr.num_buffers, 3);
        assert_eq!(lens, vec![1024, 1024, len32(HDR_LEN + 3000 - 2048)]);
        assert_eq!(data, big);
        // The chains it did not need were put back: the next frame takes the 4th.
        let small = frame(100, 4);
        g.host.send(&small);
        let (hdr, data, _) = g.receive();
        assert_eq!((hdr.num_buffers, data), (1, small));
    });
}

#[test]
fn without_mergeable_buffers_a_frame_takes_one_chain() {
    netns_test("without_mergeable_buffers_a_frame_takes_one_chain", || {
        let mut g = guest(Some(4000), !bit(VIRTIO_NET_F_MRG_RXBUF));
        g.post_rx(1, 1024);
        g.post_rx(1, 8192);
        // Too big for the first chain: dropped, the chain stays.
        g.host.send(&frame(3000, 5));
        let used = g.drv.settle(RXQ, QUIET);
        assert!(used.is_empty(), "{used:?} {:?}", g.stats());
        assert_eq!(g.stats().rx_dropped, 1);
        let small = frame(500, 6);
        g.host.send(&small);
        let (hdr, data, _) = g.receive();
        assert_eq!(hdr.num_buffers, 1, "num_buffers is 1 without MRG_RXBUF");
        assert_eq!(data, small);
    });
}

#[test]
fn without_receive_buffers_the_tap_is_left_alone_until_a_kick() {
    netns_test(
        "without_receive_buffers_the_tap_is_left_alone_until_a_kick",
        || {
            let mut g = guest(None, !GUEST_OFFLOADS);
            g.drv.run_events(50);
            let waiting = frame(300, 7);
            g.host.send(&waiting);
            assert!(g.drv.settle(RXQ, QUIET).is_empty());
            assert!(
                !lock(&g.handler).tap_watched(),
                "tap unwatched without buffers"
            );
            // No busy polling: with a frame waiting in the tap, the loop stays idle.
            assert_eq!(g.drv.run_events(100), 0, "the event loop spins");
            // Buffers + kick: the waiting frame comes in (and two are left: room for another).
            g.post_rx(3, 1024);
            let (hdr, data, _) = g.receive();
            assert_eq!((hdr.num_buffers, data), (1, waiting));
            assert!(lock(&g.handler).tap_watched());
        },
    );
}

/// A UDP datagram from the guest (`src`) to `dst`:9999 with a partial checksum (what a guest
/// with `CSUM` sends: the pseudo-header sum, for the host to complete).
fn udp_needing_csum(dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, data: &[u8]) -> Vec<u8> {
    let udp_len = 8 + data.len();
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&u16::try_from(20 + udp_len).unwrap().to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = |words: &[u8], init: u32| {
        let mut s = init;
        for c in words.chunks(2) {
            s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        u16::try_from(s).unwrap()
    };
    let ip_csum = !sum(&ip, 0);
    ip[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&u16::try_from(udp_len).unwrap().to_be_bytes());
    let partial = sum(&pseudo, 0);
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&9999u16.to_be_bytes());
    f.extend_from_slice(&u16::try_from(udp_len).unwrap().to_be_bytes());
    f.extend_from_slice(&partial.to_be_bytes());
    f.extend_from_slice(data);
    f
}

#[test]
fn offloads_follow_the_negotiated_features() {
    netns_test("offloads_follow_the_negotiated_features", || {
        let mut g = guest(None, u64::MAX);
        let offered = g.drv.device_features();
        for f in super::device::OFFLOAD_FEATURES {
            assert!(
                offered & bit(f) != 0,
                "offload feature {f} offered by a tap"
            );
        }
        // All accepted: the host may leave checksums and segmentation to the guest.
        assert!(ethtool_flag(TAP, ETHTOOL_GTXCSUM));
        assert!(ethtool_flag(TAP, ETHTOOL_GTSO));

        // A guest frame with a partial checksum reaches a host socket.
        let host_ip = Ipv4Addr::new(10, 9, 0, 1);
        let guest_ip = Ipv4Addr::new(10, 9, 0, 2);
        set_ipv4(TAP, host_ip, 24);
        let sock = UdpSocket::bind((host_ip, 9999)).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        let hdr = NetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..Default::default()
        };
        let dgram = udp_needing_csum(hwaddr(TAP), guest_ip, host_ip, b"checksum me");
        g.transmit(hdr, &dgram);
        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf).expect("datagram from the guest");
        assert_eq!(
            (&buf[..n], from.ip()),
            (&b"checksum me"[..], guest_ip.into())
        );

        // Reset and renegotiate without offloads: the tap stops offloading, and the same
        // frame is dropped (the guest may not ask for checksum completion now).
        g.drv
            .activate(!(GUEST_OFFLOADS | bit(VIRTIO_NET_F_CSUM)), QSIZE);
        assert!(!ethtool_flag(TAP, ETHTOOL_GTXCSUM));
        assert!(!ethtool_flag(TAP, ETHTOOL_GTSO));
        g.transmit(hdr, &dgram);
        sock.set_read_timeout(Some(QUIET)).unwrap();
        assert!(sock.recv_from(&mut buf).is_err(), "dropped without CSUM");
        assert_eq!(g.stats().tx_dropped, 1);

        // Checksum only: no TSO.
        g.drv.activate(
            !(bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6)),
            QSIZE,
        );
        assert!(ethtool_flag(TAP, ETHTOOL_GTXCSUM));
        assert!(!ethtool_flag(TAP, ETHTOOL_GTSO));
        // Reset: offloads off until the next activation.
        g.drv.write32(regs::STATUS, 0);
        assert!(!ethtool_flag(TAP, ETHTOOL_GTXCSUM));
    });
}

#[test]
fn hostile_transmit_chains_are_dropped() {
    netns_test("hostile_transmit_chains_are_dropped", || {
        let mut g = guest(None, !bit(VIRTIO_NET_F_HOST_TSO4));
        let hdr = NetHdr::default().to_bytes();
        let eth = frame(60, 8);
        // Short header; header and too little frame; a device-writable buffer.
        g.transmit_chain(&[(&hdr[..5], false)]);
        g.transmit_chain(&[(&hdr, false), (&eth[..4], false)]);
        g.transmit_chain(&[(&hdr, false), (&eth, true)]);
        // Larger than 64 KiB + headers.
        let huge = vec![0u8; MAX_FRAME_LEN + 1];
        g.transmit_chain(&[(&hdr, false), (&huge, false)]);
        // GSO the guest did not negotiate (TSO4), and one never offered (UFO).
        for gso_type in [1u8, 3] {
            let tso = NetHdr {
                flags: F_NEEDS_CSUM,
                gso_type,
                gso_size: 1000,
                csum_start: 34,
                csum_offset: 16,
                ..Default::default()
            };
            g.transmit(tso, &frame(3000, 9));
        }
        // Outside guest memory.
        let head = g
            .drv
            .submit(TXQ, &[(GuestAddress(MEM as u64 - 4), 100, false)]);
        assert_eq!(g.drv.wait_used(TXQ, 1, WAIT), vec![(u32::from(head), 0)]);
        // A descriptor loop: 100 → 101 → 100 ...
        let buf = g.drv.alloc(64);
        g.drv.write_mem(buf, &hdr);
        let next = DESC_NEXT;
        g.drv.queues[TXQ].store_raw(
            &g.drv.mem,
            100,
            &[
                Descriptor::new(buf.0, 32, next, 101),
                Descriptor::new(buf.0, 32, next, 100),
            ],
        );
        g.drv.queues[TXQ].make_available(&g.drv.mem, 100);
        g.drv.kick_queue(TXQ);
        assert_eq!(g.drv.wait_used(TXQ, 1, WAIT), vec![(100, 0)]);
        // A link past the end of the table.
        g.drv.queues[TXQ].store_raw(&g.drv.mem, 110, &[Descriptor::new(buf.0, 32, next, 999)]);
        g.drv.queues[TXQ].make_available(&g.drv.mem, 110);
        g.drv.kick_queue(TXQ);
        assert_eq!(g.drv.wait_used(TXQ, 1, WAIT), vec![(110, 0)]);

        assert_eq!(g.stats().tx_dropped, 9);
        assert_eq!(g.stats().tx_frames, 0);
        assert!(!g.needs_reset(), "bad frames do not break the device");
        assert!(
            g.host.recv(ETHERTYPE, QUIET).is_none(),
            "nothing reached the tap"
        );
        // The device still works.
        g.transmit(NetHdr::default(), &eth);
        assert_eq!(g.host.recv(ETHERTYPE, WAIT).as_deref(), Some(&eth[..]));
    });
}

#[test]
fn hostile_receive_chains_are_returned_empty() {
    netns_test("hostile_receive_chains_are_returned_empty", || {
        let mut g = guest(None, !GUEST_OFFLOADS);
        // Device-readable, too small for a header, outside memory; then good ones.
        let ro = g.drv.alloc(2048);
        let tiny = g.drv.alloc(8);
        let bad_heads = [
            g.drv.queues[RXQ].add_chain(&g.drv.mem, &[(ro, 2048, false)]),
            g.drv.queues[RXQ].add_chain(&g.drv.mem, &[(tiny, 8, true)]),
            g.drv.queues[RXQ].add_chain(&g.drv.mem, &[(GuestAddress(MEM as u64 - 16), 2048, true)]),
        ];
        let data = frame(400, 10);
        g.host.send(&data);
        g.post_rx(2, 1024);
        let used = g.drv.wait_used(RXQ, 4, WAIT);
        let expected: Vec<_> = bad_heads.iter().map(|&h| (u32::from(h), 0)).collect();
        assert_eq!(used[..3], expected[..], "bad chains come back empty, first");
        let (head, addr, _) = g.rx_posted[0];
        assert_eq!(used[3..], [(u32::from(head), len32(HDR_LEN + data.len()))]);
        let got = g.drv.read_mem(addr, HDR_LEN + data.len());
        assert_eq!(got[HDR_LEN..], data[..]);
        assert!(!g.needs_reset());
    });
}

#[test]
fn a_broken_available_ring_needs_a_reset() {
    netns_test("a_broken_available_ring_needs_a_reset", || {
        let mut g = guest(None, u64::MAX);
        // avail.idx claims more chains than the queue has.
        g.drv.queues[TXQ].set_avail_idx(&g.drv.mem, QSIZE + 5);
        g.drv.kick_queue(TXQ);
        g.drv.settle(TXQ, QUIET);
        assert!(g.needs_reset());
        // The driver resets and starts over.
        g.drv.activate(u64::MAX, QSIZE);
        assert!(!g.needs_reset());
        let eth = frame(60, 11);
        g.transmit(NetHdr::default(), &eth);
        assert_eq!(g.host.recv(ETHERTYPE, WAIT).as_deref(), Some(&eth[..]));
    });
}

#[test]
fn a_restored_nic_goes_on_with_its_new_tap() {
    netns_test("a_restored_nic_goes_on_with_its_new_tap", || {
        let mut g = guest(None, u64::MAX);
        g.post_rx(40, 2048);
        let first = frame(100, 12);
        g.host.send(&first);
        assert_eq!(g.receive().1, first);
        let saved = g.drv.transport.save();
        let DeviceState::Net(state) = &saved.device else {
            panic!("not a net state: {:?}", saved.device);
        };
        assert_eq!((state.mac, state.mtu, state.tap.as_str()), (MAC, 1500, TAP));
        assert_eq!(saved.in_flight(), None, "quiescent between events");
        let json = serde_json::to_string(&saved).unwrap();
        let saved: crate::virtio::MmioPersist = serde_json::from_str(&json).unwrap();

        // The clone's tap: opened by "someone else" and handed over as an fd.
        let fd = Tap::open(&TapSource::Name("pvt1".into()))
            .unwrap()
            .into_fd();
        let other_mac = Net::new(&NetConfig {
            tap: TapSource::Name("pvt2".into()),
            mac: Some([2, 0, 0, 0, 0, 9]),
            mtu: None,
        })
        .unwrap();
        assert!(matches!(
            g.drv.restore(Box::new(other_mac), &saved),
            Err(PersistError::Identity {
                what: "MAC address",
                ..
            })
        ));
        let net = Net::new(&NetConfig {
            tap: TapSource::from(fd),
            mac: Some(MAC),
            mtu: None,
        })
        .unwrap();
        assert_eq!(net.tap_name(), "pvt1");
        let handler = net.handler();
        let drv = g.drv.restore(Box::new(net), &saved).expect("restore");
        link_up("pvt1");
        // The restored device reads the queues where the source left them.
        let mut c = Guest {
            drv,
            handler,
            host: PacketSocket::bind("pvt1"),
            features: g.features,
            rx_posted: g.rx_posted.clone(),
        };
        assert!(ethtool_flag("pvt1", ETHTOOL_GTSO), "offloads set again");
        let second = frame(100, 13);
        c.host.send(&second);
        assert_eq!(c.receive().1, second);
        let out = frame(80, 14);
        c.transmit(NetHdr::default(), &out);
        assert_eq!(c.host.recv(ETHERTYPE, WAIT).as_deref(), Some(&out[..]));
    });
}

#[test]
fn handed_over_fds_must_be_taps_with_vnet_headers() {
    netns_test("handed_over_fds_must_be_taps_with_vnet_headers", || {
        let not_a_tap: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        assert!(matches!(
            Tap::open(&TapSource::from(not_a_tap)),
            Err(TapError::NotATap(_))
        ));
        assert!(matches!(
            Net::new(&NetConfig {
                mtu: Some(10),
                ..NetConfig::named(TAP)
            }),
            Err(NetError::Mtu(10))
        ));
        assert!(matches!(
            Net::new(&NetConfig {
                mac: Some([1, 0, 0, 0, 0, 1]),
                ..NetConfig::named(TAP)
            }),
            Err(NetError::MulticastMac(_))
        ));
    });
}
