//! The tap device the VMM's virtio-net reads and writes: `/dev/net/tun` with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte virtio-net header
//! (`struct virtio_net_hdr_v1`, what a virtio 1.0 device with `VIRTIO_F_VERSION_1` puts in
//! front of every frame; the kernel's default would be the legacy 10 bytes). Opened
//! non-blocking and close-on-exec for the VMM's event loop. The device is not persistent:
//! it disappears (with its qdisc and filters) when the last fd closes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Bytes of virtio-net header in front of each frame on the tap fd.
pub const VNET_HDR_LEN: usize = 12;

/// Creates tap `name` in a new network namespace of its own, which lives as long as the
/// returned fd (the tap's socket holds it): a tap that reaches nothing, for a template VM's
/// NIC (its clones get the pods' taps instead). Nothing appears in the host's namespace.
pub fn create_detached(name: &str) -> io::Result<OwnedFd> {
    let name = name.to_string();
    std::thread::Builder::new()
        .name("tap-detached".into())
        .spawn(move || {
            // SAFETY: unshare only changes this short-lived thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            create(&name)
        })?
        .join()
        .map_err(|_| io::Error::other("the tap-detached thread panicked"))?
}

/// Creates tap `name` in the calling thread's network namespace; returns its fd.
pub fn create(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tap name {name:?} must have 1 to 15 bytes"),
        ));
    }
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    req.ifr_ifru.ifru_flags =
        libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)
            .expect("the TUN flags fit a short");
    // SAFETY: TUNSETIFF reads and writes `req`, valid for the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let hdr_len = libc::c_int::try_from(VNET_HDR_LEN).expect("a virtio-net header is 12 bytes");
    // SAFETY: TUNSETVNETHDRSZ reads one int, valid for the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file.into())
}
