//! Guest tier for the virtio devices: one boot of the real guest kernel whose init runs
//! `pvtest devices` (rootfs/guest-test) against a virtio-blk disk, a virtio-fs share, the
//! hybrid vsock and a virtio-net NIC, while this test plays the host side and checks the
//! results on the host.
//!
//! The NIC's host side is a tap in a network namespace the test makes for itself
//! (`devices::virtio::net::test_net::in_new_netns`): podvisor is started from that
//! namespace and the test's TCP sockets live there, so nothing touches the host's network
//! and everything goes away with the test. Without root (no taps) the NIC part is left out
//! with a loud note, or fails with PODVISOR_REQUIRE_KVM=1.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{guest_artifacts, temp_path, GuestArtifacts};
use devices::virtio::net::test_net;

const GUEST_TO_HOST_PORT: u32 = 5000;
const HOST_TO_GUEST_PORT: u32 = 6000;
const MARKER_OFFSET: usize = 1 << 20;
const MARKER: &[u8] = b"podvisor-guest-was-here";
/// The NIC: host tap (in the test's namespace) and addresses, as `pvtest` expects them.
const TAP: &str = "pvnet0";
const GUEST_MAC: &str = "02:00:00:00:00:02";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const NET_GUEST_TO_HOST_PORT: u16 = 7000;
const NET_HOST_TO_GUEST_PORT: u16 = 7001;
const NET_BYTES: usize = 512 << 10;

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn guest_uses_blk_fs_vsock_and_net() {
    const TEST: &str = "guest_uses_blk_fs_vsock_and_net";
    let Some(guest) = guest_artifacts(TEST) else {
        return;
    };
    let _vms = common::vm_slots::take(1);
    let initrd = guest.initrd.with_file_name("devices-test.cpio");
    if !common::require_file(TEST, &initrd, "run `make test`") {
        return;
    }
    if test_net::can_make_taps() {
        test_net::in_new_netns(move || run_devices_guest(guest, initrd, true));
    } else {
        assert!(
            !common::kvm_required(),
            "{TEST}: the NIC check needs root and /dev/net/tun"
        );
        eprintln!("\n*** {TEST}: NO NIC CHECK (needs root and /dev/net/tun) ***\n");
        run_devices_guest(guest, initrd, false);
    }
}

/// Boots the devices guest (with a NIC on a fresh tap if `net`; then the caller is in a
/// private network namespace) and checks every device from the host side.
fn run_devices_guest(guest: GuestArtifacts, initrd: PathBuf, net: bool) {
    let net_host = net.then(NetHost::start);
    let dir = temp_path("devices");
    std::fs::create_dir_all(dir.join("share")).unwrap();

    // Disk: a pattern in the first MiB, whose hash the guest reports.
    let pattern: Vec<u8> = (0..u32::try_from(MARKER_OFFSET).unwrap())
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let disk = dir.join("disk.img");
    let mut image = pattern.clone();
    image.resize(64 << 20, 0);
    std::fs::write(&disk, &image).unwrap();
    std::fs::write(dir.join("share/from-host.txt"), "hello from host\n").unwrap();

    // Guest -> host vsock: the device connects to <uds>_<port>; echo one line.
    let uds = dir.join("vsock.sock");
    let listener = UnixListener::bind(format!("{}_{GUEST_TO_HOST_PORT}", uds.display())).unwrap();
    let echo = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(stream.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        (&stream).write_all(line.as_bytes()).unwrap();
        line
    });

    let mut child = Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .args(["boot", "--kernel"])
        .arg(&guest.kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--disk")
        .arg(&disk)
        .arg("--share")
        .arg(format!("share={}", dir.join("share").display()))
        .arg("--vsock")
        .arg(&uds)
        .args(if net {
            vec!["--net".to_string(), format!("{TAP},mac={GUEST_MAC}")]
        } else {
            Vec::new()
        })
        .args(["--mem-mib", "256", "--timeout", "900"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Read the console; when the guest listens, play the host -> guest side.
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut console = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap_or_default();
            console.push_str(&line);
            console.push('\n');
            let _ = lines_tx.send(line);
        }
        console
    });
    let mut host_to_guest = None;
    let mut net_host_to_guest = None;
    while let Ok(line) = lines_rx.recv_timeout(Duration::from_secs(900)) {
        if line.contains("pvtest: vsock-listen ready") {
            // Every device is active by now: each thread that handles guest data is
            // confined.
            if let Err(e) = common::threads::check_guest_threads_confined(
                child.id(),
                &["vcpu0", "vmm-events", "fs-share", "blk-io"],
            ) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{e}");
            }
            host_to_guest = Some(connect_and_echo(&uds));
        }
        if line.contains("pvtest: net-listen ready") {
            net_host_to_guest = Some(tcp_send_to_guest());
        }
        if line.contains("pvtest: done") {
            break;
        }
    }
    let status = child.wait().unwrap();
    let console = reader.join().unwrap();
    // What the guest reported (shown with --nocapture).
    for line in console.lines().filter(|l| l.contains("pvtest:")) {
        eprintln!("{line}");
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "console:\n{console}\nstderr:\n{stderr}"
    );

    // blk: the guest saw the host's bytes, and the host sees the guest's marker.
    let expected = format!("pvtest: blk ok hash={:016x}", fnv1a(&pattern));
    assert!(console.contains(&expected), "{expected} not in:\n{console}");
    let image = std::fs::read(&disk).unwrap();
    assert_eq!(&image[MARKER_OFFSET..MARKER_OFFSET + MARKER.len()], MARKER);

    // fs: what the guest did is on the host.
    assert!(console.contains("pvtest: fs ok"), "{console}");
    let share = dir.join("share");
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest.txt")).unwrap(),
        "guest read: hello from host"
    );
    assert_eq!(
        std::fs::metadata(share.join("hardlink.txt"))
            .unwrap()
            .nlink(),
        2
    );
    assert_eq!(
        std::fs::read_link(share.join("symlink.txt"))
            .unwrap()
            .to_str(),
        Some("from-guest.txt")
    );
    assert!(!share.join("doomed.txt").exists());
    assert_eq!(
        std::fs::metadata(share.join("big.bin")).unwrap().len(),
        4 << 20
    );

    // vsock both ways.
    assert_eq!(echo.join().unwrap(), "hello from guest\n");
    assert!(console.contains("pvtest: vsock-connect ok"), "{console}");
    let echoed = host_to_guest.expect("the guest never listened on vsock");
    assert_eq!(echoed, 1 << 20, "{console}");
    assert!(
        console.contains("pvtest: vsock-listen ok echoed_bytes=1048576"),
        "{console}"
    );
    // net both ways, over TCP through the tap.
    if let Some(host) = net_host {
        let up = format!("pvtest: net-up ok mac={GUEST_MAC} mtu=1500");
        assert!(console.contains(&up), "{up} not in:\n{console}");
        let payload = net_payload();
        let expected = format!("{} {:016x}", payload.len(), fnv1a(&payload));
        assert_eq!(host.finish(), expected, "guest -> host TCP data");
        assert!(
            console.contains(&format!("pvtest: net-connect ok sent={expected}")),
            "{console}"
        );
        let sent = net_host_to_guest.expect("the guest never listened on TCP");
        assert_eq!(
            sent, expected,
            "host -> guest TCP data, as the guest summed it"
        );
        assert!(
            console.contains(&format!("pvtest: net-listen ok received={expected}")),
            "{console}"
        );
    } else {
        assert!(console.contains("pvtest: net skipped"), "{console}");
    }
    assert!(console.contains("pvtest: done ok"), "{console}");

    // Nothing left behind: the VM's vsock socket is gone.
    assert!(!uds.exists(), "vsock socket left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Host -> guest through the hybrid vsock: `CONNECT <port>`, `OK <hostport>`, then 1 MiB
/// echoed back. Returns the number of bytes echoed.
fn connect_and_echo(uds: &std::path::Path) -> usize {
    let mut stream = UnixStream::connect(uds).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    stream
        .write_all(format!("CONNECT {HOST_TO_GUEST_PORT}\n").as_bytes())
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "hybrid vsock answered {ok:?}");
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    let writer = {
        let mut s = stream.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || {
            s.write_all(&data).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    reader.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back, data, "echo differs");
    back.len()
}

fn net_payload() -> Vec<u8> {
    (0..u32::try_from(NET_BYTES).unwrap())
        .map(|i| (i % 249) as u8 ^ 0x5a)
        .collect()
}

/// The host end of the guest's NIC: a tap with 10.0.2.1/24 in the caller's namespace (which
/// podvisor, started from there, attaches to by name) and a TCP server on it that reads
/// what the guest sends until EOF and answers `<bytes> <fnv1a hash>`.
struct NetHost {
    server: JoinHandle<String>,
}

impl NetHost {
    fn start() -> NetHost {
        test_net::create_persistent_tap(TAP);
        test_net::set_ipv4(TAP, HOST_IP, 24);
        test_net::link_up(TAP);
        let listener = TcpListener::bind(SocketAddrV4::new(HOST_IP, NET_GUEST_TO_HOST_PORT))
            .expect("TCP listener on the tap");
        listener.set_nonblocking(true).unwrap();
        let server = std::thread::spawn(move || {
            // The guest connects late in its run; give up with the VM's own timeout.
            let deadline = Instant::now() + Duration::from_secs(900);
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return "no connection from the guest".to_string();
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => return format!("accept: {e}"),
                }
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(300)))
                .unwrap();
            let mut data = Vec::new();
            if let Err(e) = stream.read_to_end(&mut data) {
                return format!("read: {e} after {} bytes", data.len());
            }
            let summary = format!("{} {:016x}", data.len(), fnv1a(&data));
            let _ = stream.write_all(format!("{summary}\n").as_bytes());
            summary
        });
        NetHost { server }
    }

    /// What the server got from the guest.
    fn finish(self) -> String {
        self.server.join().expect("TCP server thread")
    }
}

/// Host -> guest over TCP: sends the payload to the guest's listener, then reads the
/// guest's `<bytes> <hash>` line.
fn tcp_send_to_guest() -> String {
    let mut stream = TcpStream::connect_timeout(
        &SocketAddrV4::new(GUEST_IP, NET_HOST_TO_GUEST_PORT).into(),
        Duration::from_secs(120),
    )
    .expect("connect to the guest over TCP");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    stream.write_all(&net_payload()).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply.trim().to_string()
}
