//! Host-side network plumbing for NIC tests (this crate's and, with the `test-utils`
//! feature, the guest tier's): a private network namespace per test, interface set-up by
//! ioctl (no `ip` binary needed), and an `AF_PACKET` socket that sees a tap's frames.
//!
//! [`in_new_netns`] runs a closure on a thread that `unshare(CLONE_NEWNET)`s first: every
//! tap, address and socket the closure makes lives in that namespace, and so does every
//! process it spawns. When the thread ends and those processes exit the namespace goes away
//! with everything in it (persistent taps included), also when the test panics: nothing is
//! left behind on the host. Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN).
//!
//! Helpers panic with a message on failure (they are test code).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::tap::{Tap, TapSource};

/// Runs `f` in a new network namespace (on its own thread) and returns its result; a
/// panic in `f` is passed on. IPv6 is off in the namespace, so that interfaces coming up
/// do not send router solicitations and MLD reports through the taps under test.
pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let thread = std::thread::Builder::new()
        .name("netns-test".into())
        .spawn(move || {
            // SAFETY: unshare with a flag only; affects this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                panic!(
                    "unshare(CLONE_NEWNET): {} (the NIC tests need root)",
                    io::Error::last_os_error()
                );
            }
            for key in ["all", "default"] {
                let path = format!("/proc/sys/net/ipv6/conf/{key}/disable_ipv6");
                // Absent without IPv6 support: nothing to turn off then.
                let _ = std::fs::write(path, "1");
            }
            f()
        })
        .expect("spawn the netns thread");
    match thread.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Whether this process may make network namespaces and taps (root with /dev/net/tun).
pub fn can_make_taps() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::path::Path::new(super::tap::TUN_DEVICE).exists()
}

/// Creates a persistent tap `name` (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR) that another process
/// can attach to by name; it lives until its namespace goes away.
pub fn create_persistent_tap(name: &str) {
    let tap = Tap::open(&TapSource::Name(name.into())).expect("create tap");
    // SAFETY: TUNSETPERSIST takes its argument by value; fd is a tap.
    let rc = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    assert_eq!(rc, 0, "TUNSETPERSIST: {}", io::Error::last_os_error());
}

/// `struct ifreq` with the union as raw bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Self {
        assert!(name.len() < libc::IFNAMSIZ, "interface name {name:?}");
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
}

fn ctl_socket() -> OwnedFd {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: fd is fresh and ours.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn ifreq_ioctl(req: libc::c_ulong, r: &mut IfReq, what: &str) {
    let sock = ctl_socket();
    // SAFETY: the request takes a `struct ifreq`, which `r` is (name + 24-byte union).
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), req, r as *mut IfReq) };
    assert_eq!(rc, 0, "{what}: {}", io::Error::last_os_error());
}

/// Brings interface `name` up.
pub fn link_up(name: &str) {
    let mut r = IfReq::new(name);
    ifreq_ioctl(libc::SIOCGIFFLAGS, &mut r, "SIOCGIFFLAGS");
    let flags = i16::from_ne_bytes([r.data[0], r.data[1]]) | i16::try_from(libc::IFF_UP).unwrap();
    r.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ifreq_ioctl(libc::SIOCSIFFLAGS, &mut r, "SIOCSIFFLAGS");
}

/// Gives interface `name` the address `addr/prefix`.
pub fn set_ipv4(name: &str, addr: Ipv4Addr, prefix: u8) {
    let sockaddr = |a: Ipv4Addr| {
        let mut d = [0u8; 24];
        d[..2].copy_from_slice(&u16::try_from(libc::AF_INET).unwrap().to_ne_bytes());
        d[4..8].copy_from_slice(&a.octets());
        d
    };
    let mut r = IfReq::new(name);
    r.data = sockaddr(addr);
    ifreq_ioctl(libc::SIOCSIFADDR, &mut r, "SIOCSIFADDR");
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0));
    r.data = sockaddr(mask);
    ifreq_ioctl(libc::SIOCSIFNETMASK, &mut r, "SIOCSIFNETMASK");
}

/// Sets interface `name`'s MTU.
pub fn set_mtu(name: &str, mtu: u32) {
    let mut r = IfReq::new(name);
    r.data[..4].copy_from_slice(&i32::try_from(mtu).expect("an MTU").to_ne_bytes());
    ifreq_ioctl(libc::SIOCSIFMTU, &mut r, "SIOCSIFMTU");
}

/// Interface `name`'s index.
pub fn ifindex(name: &str) -> i32 {
    let mut r = IfReq::new(name);
    ifreq_ioctl(libc::SIOCGIFINDEX, &mut r, "SIOCGIFINDEX");
    i32::from_ne_bytes([r.data[0], r.data[1], r.data[2], r.data[3]])
}

/// Interface `name`'s MAC address.
pub fn hwaddr(name: &str) -> [u8; 6] {
    let mut r = IfReq::new(name);
    ifreq_ioctl(libc::SIOCGIFHWADDR, &mut r, "SIOCGIFHWADDR");
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&r.data[2..8]);
    mac
}

/// `ETHTOOL_GTXCSUM`: is transmit checksum offload on?
pub const ETHTOOL_GTXCSUM: u32 = 0x16;
/// `ETHTOOL_GTSO`: is TCP segmentation offload on?
pub const ETHTOOL_GTSO: u32 = 0x1e;

/// An `ethtool` boolean query (`ETHTOOL_G*`) on interface `name`.
pub fn ethtool_flag(name: &str, cmd: u32) -> bool {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue { cmd, data: 0 };
    let mut r = IfReq::new(name);
    let ptr = (&mut value as *mut EthtoolValue) as usize;
    r.data[..8].copy_from_slice(&ptr.to_ne_bytes());
    ifreq_ioctl(libc::SIOCETHTOOL, &mut r, "SIOCETHTOOL");
    value.data != 0
}

/// A raw `AF_PACKET` socket on one interface: sends frames out of it and receives what
/// comes in (frames it sent itself are skipped).
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// A socket bound to interface `name` for every protocol.
    pub fn bind(name: &str) -> PacketSocket {
        let proto = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: fd is fresh and ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex(name);
        // SAFETY: addr is a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                libc::socklen_t::try_from(std::mem::size_of_val(&addr)).unwrap(),
            )
        };
        assert_eq!(rc, 0, "bind AF_PACKET: {}", io::Error::last_os_error());
        PacketSocket { fd }
    }

    /// Sends one Ethernet frame out of the interface.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            isize::try_from(frame.len()).unwrap(),
            "AF_PACKET send: {}",
            io::Error::last_os_error()
        );
    }

    /// The next frame that came in through the interface with EtherType `ethertype`, or
    /// `None` after `timeout`.
    pub fn recv(&self, ethertype: u16, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 70_000];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe {
                libc::poll(
                    &mut pfd,
                    1,
                    i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX),
                )
            } <= 0
            {
                continue;
            }
            // SAFETY: sockaddr_ll is plain data; all-zero is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = libc::socklen_t::try_from(std::mem::size_of_val(&from)).unwrap();
            // SAFETY: buffer and address are valid for the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 14 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let frame = &buf[..usize::try_from(n).unwrap()];
            if u16::from_be_bytes([frame[12], frame[13]]) == ethertype {
                return Some(frame.to_vec());
            }
        }
    }
}

/// An Ethernet frame: broadcast destination, `src`, `ethertype`, `payload`.
pub fn ether_frame(src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}
