//! Unit tests (spec parsing, request building) and the host tier of the wiring: a pod
//! namespace made like CNI makes one (veth `eth0` with addresses and a default route, its
//! peer in a second "host" namespace), wired, then frames through the tap fd both ways.
//!
//! The namespaces exist only as open fds of this process (a thread unshares, hands its
//! namespace fd out and exits): when the test ends, even by a panic or a kill, the kernel
//! removes them with every veth, tap and qdisc inside. Needs root; otherwise SKIP.

use std::fs::File;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use podvisor_agent_protocol::rtnl::{Cidr, NewRoute};

use super::*;

fn mac(last: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, last])
}

fn link(index: u32, name: &str, kind: Option<&str>) -> Link {
    Link {
        index,
        name: name.into(),
        mac: Some(mac(u8::try_from(index).unwrap())),
        mtu: 1450,
        up: true,
        loopback: name == "lo",
        ether: name != "lo",
        kind: kind.map(String::from),
    }
}

fn route(dst: Option<&str>, gw: Option<&str>, oif: u32, kernel: bool) -> Route {
    Route {
        destination: dst.map(|d| d.parse().unwrap()),
        gateway: gw.map(|g| g.parse().unwrap()),
        source: None,
        oif: Some(oif),
        scope: if gw.is_some() { 0 } else { 253 },
        kernel,
        ipv6: false,
    }
}

#[test]
fn builds_the_agent_request_from_what_the_netns_has() {
    let links = vec![
        link(1, "lo", None),
        link(2, "eth0", Some("veth")),
        link(3, "tap0_pv", Some("tun")),
        link(4, "net1", Some("veth")),
    ];
    let wired = cni_links(&links);
    assert_eq!(
        wired.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        ["eth0", "net1"]
    );
    let addr = |index, cidr: &str, scope| Address {
        index,
        cidr: cidr.parse().unwrap(),
        scope,
    };
    let addresses = [
        addr(1, "127.0.0.1/8", 254),
        addr(2, "10.88.0.5/16", 0),
        addr(2, "fd00::5/64", 0),
        addr(2, "fe80::1/64", 253),
        addr(4, "192.168.9.2/24", 0),
    ];
    let routes = [
        route(None, Some("10.88.0.1"), 2, false),
        route(Some("10.88.0.0/16"), None, 2, true),
        route(Some("10.99.0.0/16"), Some("10.88.0.254"), 2, false),
        route(Some("192.168.10.0/24"), None, 4, false),
        route(Some("172.16.0.0/12"), Some("10.0.0.1"), 3, false),
    ];
    let req = agent_request(&wired, &addresses, &routes);
    assert_eq!(req.interfaces.len(), 2);
    assert_eq!(req.interfaces[0].mac, "02:00:00:00:00:02");
    assert_eq!(req.interfaces[0].name, "eth0");
    assert_eq!(req.interfaces[0].mtu, 1450);
    assert_eq!(req.interfaces[0].addresses, ["10.88.0.5/16", "fd00::5/64"]);
    assert_eq!(req.interfaces[1].addresses, ["192.168.9.2/24"]);
    let routes: Vec<String> = req
        .routes
        .iter()
        .map(|r| format!("{}|{}|{}|{}", r.destination, r.gateway, r.device, r.scope))
        .collect();
    // Link-scope first; kernel prefix routes and routes via other links left out.
    assert_eq!(
        routes,
        [
            "192.168.10.0/24||net1|253",
            "|10.88.0.1|eth0|0",
            "10.99.0.0/16|10.88.0.254|eth0|0",
        ]
    );
}

// ---- host tier -----------------------------------------------------------------------

fn skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP pod network host tier: needs root and /dev/net/tun");
        return true;
    }
    false
}

/// A new, empty network namespace, alive while the returned fd is open.
fn new_netns() -> OwnedFd {
    std::thread::spawn(|| {
        // SAFETY: unshare only changes this (short-lived) thread's namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        OwnedFd::from(File::open("/proc/thread-self/ns/net").unwrap())
    })
    .join()
    .unwrap()
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn in_ns<T: Send>(fd: &OwnedFd, f: impl FnOnce(&mut Rtnl) -> T + Send) -> T {
    Netns::open(&fd_path(fd))
        .unwrap()
        .run("test-netns", || f(&mut Rtnl::open().unwrap()))
        .unwrap()
}

fn up(nl: &mut Rtnl, name: &str) -> Link {
    let l = nl.link_by_name(name).unwrap().unwrap();
    nl.set_up(l.index, true).unwrap();
    l
}

/// No tap of ours and no ingress qdisc on CNI's `eth0` (which stays) in `pod_ns`.
fn assert_unwired(pod_ns: &OwnedFd, when: &str) {
    in_ns(pod_ns, |nl| {
        assert!(
            nl.link_by_name("tap0_pv").unwrap().is_none(),
            "tap left {when}"
        );
        let eth0 = nl.link_by_name("eth0").unwrap().expect("CNI's veth stays");
        assert!(
            !nl.has_ingress_qdisc(eth0.index).unwrap(),
            "qdisc left on eth0 {when}"
        );
    });
}

/// A pod namespace with a bare CNI-like veth `eth0` (up, no address) whose peer `peer0`
/// is in a second namespace; returns (pod, host) namespaces.
fn pod_ns_with_bare_veth() -> (OwnedFd, OwnedFd) {
    let pod_ns = new_netns();
    let host_ns = new_netns();
    let host_ns_fd = host_ns.as_fd();
    in_ns(&pod_ns, |nl| {
        nl.add_veth("eth0", "peer0", Some(host_ns_fd), None)
            .unwrap();
        up(nl, "eth0");
    });
    (pod_ns, host_ns)
}

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 123, 0, 2);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 123, 0, 1);

/// The internet checksum of `data` with an initial sum.
fn checksum(mut sum: u32, data: &[u8]) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop above folded the carries: the sum fits 16 bits.
    !u16::try_from(sum).unwrap()
}

/// virtio-net header (zeroed) + Ethernet + IPv4 + UDP with correct checksums.
fn udp_frame(
    dst_mac: MacAddr,
    src_mac: MacAddr,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let udp_len16 = u16::try_from(udp_len).unwrap();
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend(src.1.to_be_bytes());
    udp.extend(dst.1.to_be_bytes());
    udp.extend(udp_len16.to_be_bytes());
    udp.extend([0, 0]);
    udp.extend(payload);
    let mut pseudo = Vec::new();
    pseudo.extend(src.0.octets());
    pseudo.extend(dst.0.octets());
    pseudo.extend([0, 17]);
    pseudo.extend(udp_len16.to_be_bytes());
    pseudo.extend(&udp);
    let sum = checksum(0, &pseudo);
    udp[6..8].copy_from_slice(&(if sum == 0 { 0xffff } else { sum }).to_be_bytes());

    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&(20 + udp_len16).to_be_bytes());
    ip.extend(src.0.octets());
    ip.extend(dst.0.octets());
    let sum = checksum(0, &ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());

    let mut frame = vec![0u8; tap::VNET_HDR_LEN];
    frame.extend(dst_mac.0);
    frame.extend(src_mac.0);
    frame.extend([0x08, 0x00]);
    frame.extend(ip);
    frame.extend(udp);
    frame
}

/// virtio-net header + an ARP reply "`ip` is at `mac`" to (`to_mac`, `to_ip`).
fn arp_reply(mac: MacAddr, ip: Ipv4Addr, to_mac: MacAddr, to_ip: Ipv4Addr) -> Vec<u8> {
    let mut frame = vec![0u8; tap::VNET_HDR_LEN];
    frame.extend(to_mac.0);
    frame.extend(mac.0);
    frame.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    frame.extend(mac.0);
    frame.extend(ip.octets());
    frame.extend(to_mac.0);
    frame.extend(to_ip.octets());
    frame
}

/// Reads frames (virtio-net header stripped) from the non-blocking tap fd until `want`
/// picks one, within 5 s.
fn read_tap_until<T>(tap: &OwnedFd, mut want: impl FnMut(&[u8]) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    let mut seen = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no wanted frame on the tap ({seen} others seen)"
        );
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout_ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the call.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(n) = usize::try_from(n) else {
            continue;
        };
        if n <= tap::VNET_HDR_LEN {
            continue;
        }
        seen += 1;
        if let Some(v) = want(&buf[tap::VNET_HDR_LEN..n]) {
            return v;
        }
    }
}

fn write_tap(tap: &OwnedFd, frame: &[u8]) {
    // SAFETY: frame is valid for its length.
    let n = unsafe { libc::write(tap.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    assert_eq!(
        usize::try_from(n).ok(),
        Some(frame.len()),
        "{}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn wires_a_cni_netns_to_a_tap_both_ways() {
    if skip() {
        return;
    }
    let pod_ns = new_netns();
    let host_ns = new_netns();
    // What CNI does: a veth pair, eth0 in the pod namespace with an address and a default
    // route, the peer in the "host" namespace with the gateway's address.
    let host_ns_fd = host_ns.as_fd();
    let eth0_mac = in_ns(&pod_ns, |nl| {
        nl.add_veth("eth0", "peer0", Some(host_ns_fd), None)
            .unwrap();
        let eth0 = up(nl, "eth0");
        nl.set_link(
            eth0.index,
            &LinkChange {
                mtu: Some(1450),
                ..Default::default()
            },
        )
        .unwrap();
        nl.add_address(eth0.index, Cidr::new(POD_IP.into(), 24).unwrap())
            .unwrap();
        nl.add_address(eth0.index, "fd00:123::2/64".parse().unwrap())
            .unwrap();
        nl.add_route(&NewRoute {
            destination: None,
            gateway: Some(PEER_IP.into()),
            source: None,
            oif: eth0.index,
            scope: 0,
        })
        .unwrap();
        eth0.mac.unwrap()
    });
    let (peer_mac, peer_sock) = in_ns(&host_ns, |nl| {
        let peer = up(nl, "peer0");
        nl.add_address(peer.index, Cidr::new(PEER_IP.into(), 24).unwrap())
            .unwrap();
        let sock = UdpSocket::bind((PEER_IP, 4000)).unwrap();
        (peer.mac.unwrap(), sock)
    });
    peer_sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();

    let net = PodNetwork::setup(&fd_path(&pod_ns)).unwrap();
    assert_eq!(net.nics.len(), 1);
    let nic = &net.nics[0];
    assert_eq!(
        (nic.name.as_str(), nic.mac, nic.mtu),
        ("eth0", eth0_mac.0, 1450)
    );
    assert_eq!(nic.tap_name, "tap0_pv");
    let req = &net.request;
    assert_eq!(req.interfaces[0].mac, eth0_mac.to_string());
    assert_eq!(
        req.interfaces[0].addresses,
        ["10.123.0.2/24", "fd00:123::2/64"]
    );
    assert_eq!(req.routes.len(), 1, "{:?}", req.routes);
    assert_eq!(req.routes[0].gateway, "10.123.0.1");
    assert_eq!(req.routes[0].device, "eth0");
    let (tap_index, eth0_index) = in_ns(&pod_ns, |nl| {
        let tap = nl.link_by_name("tap0_pv").unwrap().expect("the tap exists");
        let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
        assert!(tap.up);
        assert_eq!(tap.mtu, 1450);
        assert_eq!(nl.redirect_targets(eth0.index).unwrap(), [tap.index]);
        assert_eq!(nl.redirect_targets(tap.index).unwrap(), [eth0.index]);
        (tap.index, eth0.index)
    });
    assert_ne!(tap_index, eth0_index);
    let tap = nic.tap_fd().unwrap();

    // Guest → host: a UDP datagram written into the tap leaves through eth0.
    write_tap(
        &tap,
        &udp_frame(
            peer_mac,
            eth0_mac,
            (POD_IP, 5555),
            (PEER_IP, 4000),
            b"from the guest",
        ),
    );
    let mut buf = [0u8; 64];
    let (n, from) = peer_sock
        .recv_from(&mut buf)
        .expect("the datagram reached the peer");
    assert_eq!(&buf[..n], b"from the guest");
    assert_eq!(from, (POD_IP, 5555).into());

    // Host → guest: the peer's ARP request comes out of the tap; the "guest" answers it
    // through the tap; then the datagram arrives on the tap.
    peer_sock.send_to(b"to the guest", (POD_IP, 5555)).unwrap();
    let asked_for = read_tap_until(&tap, |f| {
        (f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1])
            .then(|| Ipv4Addr::new(f[38], f[39], f[40], f[41]))
            .filter(|ip| *ip == POD_IP)
    });
    assert_eq!(asked_for, POD_IP);
    write_tap(&tap, &arp_reply(eth0_mac, POD_IP, peer_mac, PEER_IP));
    let payload = read_tap_until(&tap, |f| {
        (f.len() >= 42 && f[0..6] == eth0_mac.0 && f[12..14] == [0x08, 0x00] && f[23] == 17)
            .then(|| f[42..].to_vec())
    });
    assert_eq!(payload, b"to the guest");
    drop(tap);

    net.teardown().unwrap();
    assert_unwired(&pod_ns, "after teardown");
}

#[test]
fn a_netns_without_interfaces_is_refused_and_left_clean() {
    if skip() {
        return;
    }
    let pod_ns = new_netns();
    let err = PodNetwork::setup(&fd_path(&pod_ns)).unwrap_err();
    assert!(
        err.to_string()
            .contains("has no non-loopback interface: did CNI run?"),
        "{err}"
    );
    in_ns(&pod_ns, |nl| {
        assert_eq!(nl.links().unwrap().len(), 1, "only lo");
    });
    let err = PodNetwork::setup(std::path::Path::new("/nonexistent/netns")).unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot open the pod network namespace"),
        "{err}"
    );
}

#[test]
fn a_failed_wiring_leaves_nothing() {
    if skip() {
        return;
    }
    let (pod_ns, _host_ns) = pod_ns_with_bare_veth();
    in_ns(&pod_ns, |nl| {
        let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
        // Someone else's ingress qdisc on the veth: the wiring must fail, and undo its tap.
        nl.add_ingress_qdisc(eth0.index).unwrap();
    });
    let err = PodNetwork::setup(&fd_path(&pod_ns)).unwrap_err();
    assert!(err.to_string().contains("another tc user"), "{err}");
    in_ns(&pod_ns, |nl| {
        assert!(nl.link_by_name("tap0_pv").unwrap().is_none(), "tap left");
        let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
        assert!(
            nl.has_ingress_qdisc(eth0.index).unwrap(),
            "the other user's qdisc stays"
        );
    });
    // Dropping a wired PodNetwork tears it down too.
    in_ns(&pod_ns, |nl| {
        let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
        nl.del_ingress_qdisc(eth0.index).unwrap();
    });
    drop(PodNetwork::setup(&fd_path(&pod_ns)).unwrap());
    assert_unwired(&pod_ns, "after drop");
}

#[test]
fn what_a_dead_shim_left_is_cleaned_up() {
    if skip() {
        return;
    }
    let (pod_ns, _host_ns) = pod_ns_with_bare_veth();
    let path = fd_path(&pod_ns);
    // Nothing wired: nothing to do; a namespace that is gone is fine too.
    assert!(cleanup_stale(&path).unwrap().is_empty());
    assert!(cleanup_stale(std::path::Path::new("/nonexistent/netns"))
        .unwrap()
        .is_empty());

    // A shim killed with its tap fd leaked (the tap stays) ...
    let wired = PodNetwork::setup(&path).unwrap();
    let nics_fds: Vec<OwnedFd> = wired.nics.iter().map(|n| n.tap_fd().unwrap()).collect();
    std::mem::forget(wired);
    let removed = cleanup_stale(&path).unwrap();
    assert_eq!(
        removed,
        ["ingress qdisc of eth0", "tap tap0_pv"],
        "{removed:?}"
    );
    drop(nics_fds);
    assert_unwired(&pod_ns, "after the cleanup");

    // ... and one whose tap went with it: the veth's filter redirects to a deleted link.
    let wired = PodNetwork::setup(&path).unwrap();
    let tap_index = wired.nics[0].tap_index;
    std::mem::forget(wired);
    in_ns(&pod_ns, |nl| nl.del_link(tap_index).unwrap());
    assert_eq!(cleanup_stale(&path).unwrap(), ["ingress qdisc of eth0"]);
    assert_unwired(&pod_ns, "after the second cleanup");

    // Someone else's ingress qdisc without our redirect stays.
    in_ns(&pod_ns, |nl| {
        let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
        nl.add_ingress_qdisc(eth0.index).unwrap();
    });
    assert!(cleanup_stale(&path).unwrap().is_empty());
    in_ns(&pod_ns, |nl| {
        let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
        assert!(nl.has_ingress_qdisc(eth0.index).unwrap());
    });
}

#[test]
fn port_forward_steers_any_loopback_port_to_the_guest_and_stops_with_the_pod() {
    if skip() {
        return;
    }
    // containerd's PortForward dials 127.0.0.1:<port> in the pod's namespace, where
    // nothing listens; each connection must reach the "agent" with the port dialled.
    let pod_ns = new_netns();
    in_ns(&pod_ns, |nl| {
        up(nl, "lo");
    });
    let agent_ports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = agent_ports.clone();
    let connect: forward::Connect = std::sync::Arc::new(move || {
        let (shim, mut agent) = std::os::unix::net::UnixStream::pair()?;
        let seen = seen.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut port = [0u8; 2];
            agent.read_exact(&mut port).unwrap();
            let port = u16::from_be_bytes(port);
            seen.lock().unwrap().push(port);
            let mut line = Vec::new();
            agent.read_to_end(&mut line).unwrap();
            write!(agent, "guest:{port}:").unwrap();
            agent.write_all(&line).unwrap();
        });
        Ok(shim)
    });
    let netns = Netns::open(&fd_path(&pod_ns)).unwrap();
    let forward = forward::PortForward::start(&netns, connect).unwrap();
    let dial = |port: u16| {
        netns
            .run("test-dial", move || -> std::io::Result<String> {
                use std::io::{Read, Write};
                let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
                c.write_all(b"hello")?;
                c.shutdown(std::net::Shutdown::Write)?;
                let mut out = String::new();
                c.read_to_string(&mut out)?;
                Ok(out)
            })
            .unwrap()
    };
    assert_eq!(dial(8080).unwrap(), "guest:8080:hello");
    assert_eq!(dial(12345).unwrap(), "guest:12345:hello");
    assert_eq!(*agent_ports.lock().unwrap(), [8080, 12345]);
    drop(forward);
    let err = dial(8080).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}
