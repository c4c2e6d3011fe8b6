//! Unix-domain-socket plumbing for the vsock back end: binding the VM's listening socket
//! (with the checks that turn the usual mistakes into clear errors), connecting to
//! `<uds_path>_<port>` without ever blocking, and sending without `SIGPIPE`.
//!
//! Every socket here is non-blocking: the device runs on the VMM's event loop, which also
//! serves the other devices, and must never wait for a host peer.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::{info, warn};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// Longest socket path Linux takes (`sun_path` is 108 bytes including the terminating NUL).
pub const MAX_PATH_LEN: usize = 107;

/// Errors binding the VM's listening socket.
#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    #[error("vsock socket path {path:?} is {len} bytes, longer than the {MAX_PATH_LEN} a Unix socket path may have: use a shorter directory (e.g. under /run)")]
    PathTooLong { path: PathBuf, len: usize },
    #[error("vsock socket path is empty: give the path of the Unix socket to create")]
    EmptyPath,
    #[error("vsock socket path {path:?} contains a NUL byte")]
    NulInPath { path: PathBuf },
    #[error("directory {dir:?} of the vsock socket does not exist: create it first")]
    DirMissing { dir: PathBuf },
    #[error("{path:?} exists and is not a socket: refusing to replace it; remove it or choose another vsock path")]
    NotASocket { path: PathBuf },
    #[error("another process is listening on vsock socket {path:?} (another VM with the same path?): stop it or choose another path")]
    InUse { path: PathBuf },
    #[error("cannot remove the stale vsock socket {path:?}: {source}; remove it by hand")]
    Unlink { path: PathBuf, source: io::Error },
    #[error("cannot bind the vsock socket {path:?}: {source}; check the directory's permissions")]
    Bind { path: PathBuf, source: io::Error },
}

/// The socket file this device created. Dropping it removes the file, unless something else
/// has replaced it since (checked by file type, device, inode and change time: inode
/// numbers alone are reused at once on tmpfs).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    id: FileId,
}

type FileId = (u64, u64, i64, i64);

fn file_id(m: &std::fs::Metadata) -> Option<FileId> {
    m.file_type()
        .is_socket()
        .then(|| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if file_id(&m) == Some(self.id) => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!("vsock: cannot remove socket {:?}: {e}", self.path);
                }
            }
            Ok(_) => info!(
                "vsock: {:?} was replaced by another file; leaving it in place",
                self.path
            ),
            Err(_) => {}
        }
    }
}

fn check_path(path: &Path) -> Result<(), UdsError> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Err(UdsError::EmptyPath);
    }
    if bytes.contains(&0) {
        return Err(UdsError::NulInPath { path: path.into() });
    }
    if bytes.len() > MAX_PATH_LEN {
        return Err(UdsError::PathTooLong {
            path: path.into(),
            len: bytes.len(),
        });
    }
    Ok(())
}

/// Binds the VM's listening socket at `path` (non-blocking), replacing a stale socket file
/// left by a VM that is gone. A live listener or a file that is not a socket is an error.
pub fn bind_listener(path: &Path) -> Result<(UnixListener, SocketFile), UdsError> {
    check_path(path)?;
    let dir = match path.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
        None => Path::new("/"),
    };
    if !dir.is_dir() {
        return Err(UdsError::DirMissing { dir: dir.into() });
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(UdsError::NotASocket { path: path.into() });
        }
        match connect(path) {
            Ok(_) => return Err(UdsError::InUse { path: path.into() }),
            // A listener whose backlog is full is alive too.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(UdsError::InUse { path: path.into() })
            }
            Err(_) => {}
        }
        info!("vsock: removing stale socket {path:?}");
        std::fs::remove_file(path).map_err(|source| UdsError::Unlink {
            path: path.into(),
            source,
        })?;
    }
    let bind_err = |source| UdsError::Bind {
        path: path.into(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    // Owner only: whoever may connect speaks to the guest's vsock ports (the agent).
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(bind_err)?;
    let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
    let id = file_id(&meta).ok_or_else(|| {
        bind_err(io::Error::other(
            "the bound path is not a socket (replaced at once?)",
        ))
    })?;
    Ok((
        listener,
        SocketFile {
            path: path.into(),
            id,
        },
    ))
}

/// The path guest connections to host port `port` go to: `<uds_path>_<port>`.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut p = uds_path.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Connects a non-blocking stream socket to `path`. Never blocks: a listener whose backlog is
/// full gives `WouldBlock` (Unix sockets have no connect-in-progress state).
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_PATH_LEN || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{path:?} is not a usable Unix socket path"),
        ));
    }
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).expect("AF_UNIX is 1");
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    // SAFETY: plain system call with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, and `len` (at most
    // size_of::<sockaddr_un>(), as bytes.len() <= 107) covers the family and the
    // NUL-terminated path in it.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            libc::socklen_t::try_from(len).expect("at most size_of::<sockaddr_un>()"),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// Flags of every send: a peer that went away gives `EPIPE`, not a signal that would kill
/// the VMM; never wait.
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;

/// Runs a socket call that returns a byte count or -1 with `errno`, retrying on `EINTR`.
fn retry_eintr(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `send(2)` of `buf`, without `SIGPIPE` and without blocking.
pub fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    let fd = stream.as_raw_fd();
    // SAFETY: `buf` is a valid slice for reads of `buf.len()` bytes during the call.
    retry_eintr(|| unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), SEND_FLAGS) })
}

/// [`send`] straight from guest memory.
pub fn send_volatile<B: BitmapSlice>(
    stream: &UnixStream,
    buf: &VolatileSlice<'_, B>,
) -> io::Result<usize> {
    let fd = stream.as_raw_fd();
    let guard = buf.ptr_guard();
    // SAFETY: the guard keeps `buf.len()` bytes of mapped guest memory valid at
    // `guard.as_ptr()` for its lifetime; send only reads them (racing guest writes can only
    // change the bytes sent, which is the guest's business).
    retry_eintr(|| unsafe { libc::send(fd, guard.as_ptr().cast(), buf.len(), SEND_FLAGS) })
}

/// Reads what is available, up to `buf.len()` bytes, without consuming it (`MSG_PEEK`).
pub fn peek(stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    let fd = stream.as_raw_fd();
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    // SAFETY: `buf` is a valid, exclusively borrowed slice of `buf.len()` bytes.
    retry_eintr(|| unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    #[test]
    fn bind_checks_and_cleans_up() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("v.sock");

        let long = dir.as_path().join("x".repeat(120));
        assert!(matches!(
            bind_listener(&long),
            Err(UdsError::PathTooLong { .. })
        ));
        assert!(matches!(
            bind_listener(&dir.as_path().join("missing/v.sock")),
            Err(UdsError::DirMissing { .. })
        ));
        assert!(matches!(
            bind_listener(Path::new("")),
            Err(UdsError::EmptyPath)
        ));
        let file = dir.as_path().join("file");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(
            bind_listener(&file),
            Err(UdsError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        // A stale socket (no listener) is replaced.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (listener, guard) = bind_listener(&path).unwrap();
        let mode = std::fs::symlink_metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "owner only"
        );

        let mut client = connect(&path).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.set_nonblocking(false).unwrap();
        assert_eq!(send(&server, b"hi").unwrap(), 2);
        let mut b = [0u8; 2];
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        client.write_all(b"abc").unwrap();
        let mut p = [0u8; 8];
        assert_eq!(peek(&server, &mut p).unwrap(), 3);
        let mut r = [0u8; 3];
        server.read_exact(&mut r).unwrap();
        assert_eq!(&r, b"abc");

        // The peer went away: EPIPE, no signal.
        drop(client);
        let e = send(&server, b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);

        // A live listener is not replaced.
        let err = bind_listener(&path).unwrap_err();
        assert!(matches!(err, UdsError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("another process"));
        assert!(path.exists());

        drop(guard);
        assert!(!path.exists(), "socket removed on drop");
    }

    #[test]
    fn socket_file_guard_leaves_a_replacement_alone() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("v.sock");
        let (listener, guard) = bind_listener(&path).unwrap();
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"new").unwrap();
        drop(guard);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn connect_failures_and_port_paths() {
        let dir = TempDir::new().unwrap();
        let base = dir.as_path().join("v.sock");
        assert_eq!(
            port_path(&base, 52),
            dir.as_path().join("v.sock_52"),
            "<uds>_<port>"
        );
        let e = connect(&port_path(&base, 1)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = connect(&dir.as_path().join("y".repeat(200))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
