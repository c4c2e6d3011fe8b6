//! `pvtest`: guest side of podvisor's device tests, one static binary run by the test
//! initramfs's `/init` (every extra guest process costs seconds on a nested host).
//!
//! `pvtest devices` runs, in order, and prints one `pvtest: <check> ok|FAIL ...` line each:
//! * blk: reads the first MiB of `/dev/vda` and prints its FNV-1a hash (the host compares
//!   it with the image it made), then writes a marker block at 1 MiB and `fsync`s;
//! * fs: mounts virtio-fs tag `share` on `/mnt`, reads `/mnt/from-host.txt`, writes
//!   `/mnt/from-guest.txt`, renames, hard-links, symlinks and unlinks files;
//! * vsock (guest → host): connects to CID 2 port 5000, sends `hello from guest` and
//!   expects it echoed back;
//! * vsock (host → guest): listens on port 6000, accepts one connection, echoes what it reads
//!   until EOF;
//! * net (only if the VM has a NIC, `eth0`): gives it 10.0.2.2/24 and brings it up (ioctls,
//!   no `ip` binary), reports its MAC and MTU; connects to 10.0.2.1:7000 over TCP, sends
//!   512 KiB and reads the host's `<bytes> <fnv1a hash>` line back (guest → host); then
//!   listens on 10.0.2.2:7001, receives what the host sends until EOF and answers with the
//!   same kind of line (host → guest).
//!
//! The host test reads these lines on the console and checks the disk and share afterwards.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const HOST_CID: u32 = 2;
const GUEST_TO_HOST_PORT: u32 = 5000;
const HOST_TO_GUEST_PORT: u32 = 6000;
const NIC: &str = "eth0";
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
const NET_GUEST_TO_HOST_PORT: u16 = 7000;
const NET_HOST_TO_GUEST_PORT: u16 = 7001;
const NET_BYTES: usize = 512 << 10;
/// Where the guest writes its marker on the disk.
const MARKER_OFFSET: u64 = 1 << 20;
const MARKER: &[u8] = b"podvisor-guest-was-here";

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn check_blk() -> io::Result<String> {
    let mut disk = OpenOptions::new().read(true).write(true).open("/dev/vda")?;
    let mut buf = vec![0u8; 1 << 20];
    disk.read_exact(&mut buf)?;
    let hash = fnv1a(&buf);
    disk.seek(SeekFrom::Start(MARKER_OFFSET))?;
    let mut block = vec![0u8; 4096];
    block[..MARKER.len()].copy_from_slice(MARKER);
    disk.write_all(&block)?;
    disk.sync_all()?;
    // Read back through the device.
    let mut back = vec![0u8; 4096];
    disk.read_exact_at(&mut back, MARKER_OFFSET)?;
    if back != block {
        return Err(io::Error::other("marker read back differs"));
    }
    Ok(format!("hash={hash:016x}"))
}

fn mount(source: &str, target: &str, fstype: &str) -> io::Result<()> {
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (src, tgt, fs) = (c(source), c(target), c(fstype));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn check_fs() -> io::Result<String> {
    fs::create_dir_all("/mnt")?;
    mount("share", "/mnt", "virtiofs")?;
    let from_host = fs::read_to_string("/mnt/from-host.txt")?;
    fs::write("/mnt/tmp.txt", format!("guest read: {}", from_host.trim()))?;
    fs::rename("/mnt/tmp.txt", "/mnt/from-guest.txt")?;
    fs::hard_link("/mnt/from-guest.txt", "/mnt/hardlink.txt")?;
    std::os::unix::fs::symlink("from-guest.txt", "/mnt/symlink.txt")?;
    fs::write("/mnt/doomed.txt", "x")?;
    fs::remove_file("/mnt/doomed.txt")?;
    let big: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
    fs::write("/mnt/big.bin", &big)?;
    if fs::read("/mnt/big.bin")? != big {
        return Err(io::Error::other("big file read back differs"));
    }
    let entries = fs::read_dir("/mnt")?.count();
    Ok(format!("entries={entries} big_hash={:016x}", fnv1a(&big)))
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `AF_*` address family (a small C `int`) as a sockaddr's `sa_family_t`.
fn family(af: libc::c_int) -> libc::sa_family_t {
    libc::sa_family_t::try_from(af).expect("address families fit sa_family_t")
}

/// The size of a `sockaddr_vm` (16 bytes) as `socklen_t`.
fn vsock_addr_len() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>()).expect("16 bytes")
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = family(libc::AF_VSOCK);
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn check_vsock_connect() -> io::Result<String> {
    use std::os::fd::AsRawFd;
    let sock = vsock_socket()?;
    let addr = vsock_addr(HOST_CID, GUEST_TO_HOST_PORT);
    // SAFETY: addr is a valid sockaddr_vm of the given size.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            vsock_addr_len(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stream = File::from(sock);
    let msg = b"hello from guest\n";
    stream.write_all(msg)?;
    let mut echo = vec![0u8; msg.len()];
    stream.read_exact(&mut echo)?;
    if echo != msg {
        return Err(io::Error::other(format!(
            "echo differs: {:?}",
            String::from_utf8_lossy(&echo)
        )));
    }
    Ok("echoed".into())
}

fn check_vsock_listen() -> io::Result<String> {
    use std::os::fd::AsRawFd;
    let sock = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, HOST_TO_GUEST_PORT);
    // SAFETY: addr is a valid sockaddr_vm of the given size; listen/accept on our own fd.
    unsafe {
        if libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            vsock_addr_len(),
        ) != 0
            || libc::listen(sock.as_raw_fd(), 1) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    println!("pvtest: vsock-listen ready port={HOST_TO_GUEST_PORT}");
    // SAFETY: accept on our listening fd; null address arguments are allowed.
    let conn =
        unsafe { libc::accept(sock.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
    if conn < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: conn is a fresh descriptor we own.
    let mut stream = unsafe { File::from_raw_fd(conn) };
    let mut total = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n])?;
        total += n;
    }
    Ok(format!("echoed_bytes={total}"))
}

/// An `ifreq` for `name` (the union zeroed).
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = libc::c_char::from_ne_bytes([b]);
    }
    req
}

/// An `AF_INET` socket address in an `ifreq`'s union.
fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    // SAFETY: sockaddr_in is plain data; all-zero is valid.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = family(libc::AF_INET);
    sin.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
    // SAFETY: sockaddr_in and sockaddr have the same size; plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Gives `NIC` its address and brings it up, as `ip addr add` + `ip link set up` would.
fn nic_up() -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let call = |req: libc::c_ulong, r: &mut libc::ifreq| {
        use std::os::fd::AsRawFd;
        // SAFETY: each request takes a `struct ifreq`, which `r` is.
        if unsafe { libc::ioctl(sock.as_raw_fd(), req, r as *mut libc::ifreq) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    let mut r = ifreq(NIC);
    r.ifr_ifru.ifru_addr = sockaddr_in(GUEST_IP);
    call(libc::SIOCSIFADDR, &mut r)?;
    r.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::new(255, 255, 255, 0));
    call(libc::SIOCSIFNETMASK, &mut r)?;
    let mut r = ifreq(NIC);
    call(libc::SIOCGIFFLAGS, &mut r)?;
    let up = libc::c_short::try_from(libc::IFF_UP).expect("IFF_UP is bit 0");
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { r.ifr_ifru.ifru_flags |= up };
    call(libc::SIOCSIFFLAGS, &mut r)
}

/// `<bytes> <fnv1a hash>` of everything `stream` sends until EOF.
fn read_summary(stream: &mut TcpStream) -> io::Result<String> {
    let mut data = Vec::new();
    stream.read_to_end(&mut data)?;
    Ok(format!("{} {:016x}", data.len(), fnv1a(&data)))
}

fn net_payload() -> Vec<u8> {
    (0..NET_BYTES)
        .map(|i| u8::try_from(i % 249).expect("below 249") ^ 0x5a)
        .collect()
}

fn check_net_up() -> io::Result<String> {
    nic_up()?;
    let attr = |a: &str| fs::read_to_string(format!("/sys/class/net/{NIC}/{a}"));
    Ok(format!(
        "mac={} mtu={}",
        attr("address")?.trim(),
        attr("mtu")?.trim()
    ))
}

fn check_net_connect() -> io::Result<String> {
    // The host listens before the VM starts; ARP and the first SYN may still be lost while
    // the link comes up: retry for a while.
    let addr = SocketAddrV4::new(HOST_IP, NET_GUEST_TO_HOST_PORT);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut stream = loop {
        match TcpStream::connect_timeout(&addr.into(), Duration::from_secs(20)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                println!("pvtest: net-connect retrying after {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    };
    let data = net_payload();
    stream.write_all(&data)?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let sent = format!("{} {:016x}", data.len(), fnv1a(&data));
    if reply.trim() != sent {
        return Err(io::Error::other(format!("host got {reply:?}, sent {sent}")));
    }
    Ok(format!("sent={sent}"))
}

fn check_net_listen() -> io::Result<String> {
    let listener = TcpListener::bind(SocketAddrV4::new(GUEST_IP, NET_HOST_TO_GUEST_PORT))?;
    println!("pvtest: net-listen ready port={NET_HOST_TO_GUEST_PORT}");
    let (mut stream, _) = listener.accept()?;
    let summary = read_summary(&mut stream)?;
    stream.write_all(format!("{summary}\n").as_bytes())?;
    Ok(format!("received={summary}"))
}

fn report(name: &str, result: io::Result<String>) -> bool {
    match result {
        Ok(detail) => {
            println!("pvtest: {name} ok {detail}");
            true
        }
        Err(e) => {
            println!("pvtest: {name} FAIL {e}");
            false
        }
    }
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if mode != "devices" {
        eprintln!("usage: pvtest devices");
        std::process::exit(2);
    }
    let mut ok = report("blk", check_blk());
    ok &= report("fs", check_fs());
    ok &= report("vsock-connect", check_vsock_connect());
    ok &= report("vsock-listen", check_vsock_listen());
    if std::path::Path::new(&format!("/sys/class/net/{NIC}")).exists() {
        ok &= report("net-up", check_net_up())
            && report("net-connect", check_net_connect())
            && report("net-listen", check_net_listen());
    } else {
        println!("pvtest: net skipped (no {NIC})");
    }
    println!("pvtest: done {}", if ok { "ok" } else { "FAIL" });
}
