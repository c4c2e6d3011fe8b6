//! The host side of a NIC: a Linux tap device, opened through `/dev/net/tun` with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, so that every frame read or written carries a
//! 12-byte `virtio_net_hdr_v1` in front (`TUNSETVNETHDRSZ`): the guest's header goes to the
//! host kernel as is, and the host kernel's offload information (checksum needed, GSO) comes
//! back in the same format the guest driver reads. No translation, no copy of the header
//! beyond the 12 bytes the device checks.
//!
//! Where the tap comes from is a [`TapSource`]: a name (the tap is opened, or created, in
//! the network namespace of the calling thread) or a descriptor someone else opened — the
//! shim opens the tap inside the pod's network namespace and hands the fd over, so the VMM
//! never has to enter that namespace.
//!
//! The fd is non-blocking: the device runs on the VMM's event loop. `TUNSETOFFLOAD` tells
//! the host kernel which offloads the *guest* accepts (checksum, TSO): it is set from the
//! negotiated features at activation ([`offload_flags`]) and cleared at reset.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
};

use super::HDR_LEN;
use crate::virtio::features::bit;
use crate::virtio::set_nonblocking;

/// The tun/tap control device.
pub const TUN_DEVICE: &str = "/dev/net/tun";
/// Longest interface name (`IFNAMSIZ` minus the terminating NUL).
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Where a NIC's tap comes from.
#[derive(Debug, Clone)]
pub enum TapSource {
    /// Open the tap with this name in the caller's network namespace (created if it does
    /// not exist; a tap made with `ip tuntap add NAME mode tap` is reused).
    Name(String),
    /// A tap someone else opened (e.g. the shim, inside the pod's network namespace) with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (not `IFF_MULTI_QUEUE`). The device duplicates
    /// it; the caller's copy stays valid (shared with clones of the config, e.g. a cold
    /// boot after a failed restore). Build it with `TapSource::from(owned_fd)` or
    /// `TapSource::Fd(fd.into())`. Note that the device sets `O_NONBLOCK` on the open file
    /// and the header size and offloads on the tap, which the caller's copy shares.
    Fd(Arc<OwnedFd>),
}

impl From<OwnedFd> for TapSource {
    fn from(fd: OwnedFd) -> Self {
        TapSource::Fd(Arc::new(fd))
    }
}

impl std::fmt::Display for TapSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TapSource::Name(name) => write!(f, "tap {name:?}"),
            TapSource::Fd(fd) => write!(f, "tap fd {}", fd.as_raw_fd()),
        }
    }
}

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is empty, longer than {MAX_IFNAME_LEN} bytes or has a NUL or '/': use a short interface name like tap0")]
    InvalidName(String),
    #[error("cannot open {TUN_DEVICE}: {0}; is the tun module loaded and does the process have CAP_NET_ADMIN?")]
    OpenTun(io::Error),
    #[error("cannot create or attach tap {name:?} (TUNSETIFF): {source}; a tun device or a multi-queue tap of that name exists, or CAP_NET_ADMIN is missing")]
    SetIff { name: String, source: io::Error },
    #[error("cannot duplicate the tap fd: {0}; check the process's fd limit")]
    Dup(io::Error),
    #[error("the fd handed over is not an attached tun/tap device (TUNGETIFF: {0}): open /dev/net/tun and TUNSETIFF it first")]
    NotATap(io::Error),
    #[error("tap {name:?} was opened with flags {flags:#x}; podvisor needs IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (and no IFF_MULTI_QUEUE)")]
    WrongFlags { name: String, flags: i32 },
    #[error("tap {name:?}: cannot set the virtio-net header size to {HDR_LEN} (TUNSETVNETHDRSZ): {source}")]
    VnetHdrSize { name: String, source: io::Error },
    #[error("tap {name:?}: cannot make the fd non-blocking: {source}")]
    NonBlocking { name: String, source: io::Error },
    #[error("tap {name:?}: TUNSETOFFLOAD {flags:#x} refused: {source}")]
    Offload {
        name: String,
        flags: u32,
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF / TUNGETIFF use it: the name and the flags (a short; the
/// union is padded to 24 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReqFlags {
    fn new(name: &str, flags: i32) -> Self {
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            // ifr_flags is a short; the flags passed here (TAP_FLAGS or none) fit it.
            flags: libc::c_short::try_from(flags).expect("the TUN flags fit 16 bits"),
            _pad: [0; 22],
        };
        for (dst, &b) in req.name.iter_mut().zip(name.as_bytes()) {
            *dst = libc::c_char::from_ne_bytes([b]);
        }
        req
    }

    fn name(&self) -> String {
        // The kernel NUL-terminates ifr_name; a name without a NUL reads as empty.
        let bytes: [u8; libc::IFNAMSIZ] = self.name.map(|c| c.to_ne_bytes()[0]);
        CStr::from_bytes_until_nul(&bytes)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// The flags podvisor's taps have.
const TAP_FLAGS: i32 = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// An open tap, ready for frames with a 12-byte virtio-net header.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Opens (or creates) the tap `source` names, or adopts the fd it carries, and sets it
    /// up: header size 12, non-blocking, no offloads until [`Tap::set_offload`].
    pub fn open(source: &TapSource) -> Result<Tap, TapError> {
        let tap = match source {
            TapSource::Name(name) => Self::open_named(name)?,
            TapSource::Fd(fd) => Self::adopt(fd)?,
        };
        let size = libc::c_int::try_from(HDR_LEN).expect("12 bytes");
        // SAFETY: TUNSETVNETHDRSZ reads one int from the valid pointer; fd is a tap.
        if unsafe { libc::ioctl(tap.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(TapError::VnetHdrSize {
                name: tap.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        set_nonblocking(&tap.fd).map_err(|source| TapError::NonBlocking {
            name: tap.name.clone(),
            source,
        })?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn open_named(name: &str) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() > MAX_IFNAME_LEN
            || name.bytes().any(|b| b == 0 || b == b'/')
        {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(TUN_DEVICE)
            .map_err(TapError::OpenTun)?;
        let mut req = IfReqFlags::new(name, TAP_FLAGS);
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` has its layout and
        // size (name + 24-byte union) and lives for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            fd: file.into(),
            name: req.name(),
        })
    }

    fn adopt(fd: &OwnedFd) -> Result<Tap, TapError> {
        let fd = fd.try_clone().map_err(TapError::Dup)?;
        let mut req = IfReqFlags::new("", 0);
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`, which has its layout.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::NotATap(io::Error::last_os_error()));
        }
        let flags = i32::from(req.flags) & 0xffff;
        let name = req.name();
        if flags & TAP_FLAGS != TAP_FLAGS || flags & libc::IFF_MULTI_QUEUE != 0 {
            return Err(TapError::WrongFlags { name, flags });
        }
        Ok(Tap { fd, name })
    }

    /// The tap's fd (e.g. to hand a tap opened here to another process or device).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// The interface name (in the tap's network namespace).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `TUNSETOFFLOAD`: which offloads (`TUN_F_*`) the host kernel may leave to the guest
    /// in frames it sends it.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; fd is a tap.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(TapError::Offload {
                name: self.name.clone(),
                flags,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Whether the tap takes checksum and TSO offloads (set and cleared again).
    pub fn supports_offloads(&self) -> bool {
        let ok = self.set_offload(ALL_OFFLOADS).is_ok();
        let _ = self.set_offload(0);
        ok
    }

    /// One frame (header first) into `iovs`; the frame's length is returned (a frame
    /// longer than the buffers is cut short without notice: leave room to detect it).
    pub fn readv(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        self.transfer(iovs, false)
    }

    /// One frame (header first) from `iovs`.
    pub fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        self.transfer(iovs, true)
    }

    fn transfer(&self, iovs: &[libc::iovec], write: bool) -> io::Result<usize> {
        // More than an int of iovecs is as invalid as more than IOV_MAX: EINVAL either way.
        let count = libc::c_int::try_from(iovs.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        loop {
            // SAFETY: the caller's iovecs point into live buffers (guest memory kept mapped
            // by the guest memory the caller borrowed them from, or its local arrays) with
            // their lengths; `count` is the slice's length. The kernel reads the buffers on
            // a write and writes only within them on a read.
            let n = unsafe {
                if write {
                    libc::writev(self.fd.as_raw_fd(), iovs.as_ptr(), count)
                } else {
                    libc::readv(self.fd.as_raw_fd(), iovs.as_ptr(), count)
                }
            };
            if let Ok(n) = usize::try_from(n) {
                return Ok(n);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Every offload the device may pass on.
const ALL_OFFLOADS: u32 = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;

/// The `TUNSETOFFLOAD` flags for the guest features `acked`: the host may send partial
/// checksums if the guest took `GUEST_CSUM`, and TCP segments larger than the MTU if it took
/// `GUEST_TSO4`/`GUEST_TSO6` as well (the tap refuses TSO without checksum offload).
pub fn offload_flags(acked: u64) -> u32 {
    let has = |f: u32| acked & bit(f) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_flags_follow_the_guest_features() {
        assert_eq!(offload_flags(0), 0);
        assert_eq!(
            offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM)),
            libc::TUN_F_CSUM
        );
        // TSO without checksum offload is not allowed (the tap would refuse it).
        assert_eq!(offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        assert_eq!(
            offload_flags(
                bit(VIRTIO_NET_F_GUEST_CSUM)
                    | bit(VIRTIO_NET_F_GUEST_TSO4)
                    | bit(VIRTIO_NET_F_GUEST_TSO6)
            ),
            ALL_OFFLOADS
        );
        assert_eq!(
            offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO6)),
            libc::TUN_F_CSUM | libc::TUN_F_TSO6
        );
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for name in ["", "a/b", "this-name-is-too-long", "nul\0"] {
            assert!(matches!(
                Tap::open(&TapSource::Name(name.into())),
                Err(TapError::InvalidName(_))
            ));
        }
    }

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReqFlags>(), 40);
        let r = IfReqFlags::new("tap7", TAP_FLAGS);
        assert_eq!(r.name(), "tap7");
    }
}
