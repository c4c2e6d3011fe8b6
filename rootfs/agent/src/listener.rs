//! Listening addresses: `vsock://CID:PORT` in the guest (CID -1 = any), `unix:///path` in
//! the host-test mode. Both the ttrpc server and the stdio stream listener bind through here,
//! so the two modes run the same server code with a different socket family.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::str::FromStr;

use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr, VsockAddr,
};
use podvisor_agent_protocol::{
    PORT_FORWARD_SOCKET_SUFFIX, PORT_FORWARD_VSOCK_PORT, STREAM_SOCKET_SUFFIX, STREAM_VSOCK_PORT,
};

/// Errors of parsing or binding a listening address.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "bad listen address {0:?}: use vsock://CID:PORT (CID -1 for any) or unix:///absolute/path"
    )]
    BadAddress(String),
    #[error("cannot listen on {addr}: {source}; check that the address is free and the directory exists")]
    Bind {
        addr: String,
        #[source]
        source: nix::Error,
    },
    #[error("accept on {addr} failed: {source}")]
    Accept {
        addr: String,
        #[source]
        source: nix::Error,
    },
}

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Vsock { cid: u32, port: u32 },
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = ListenError;

    fn from_str(s: &str) -> Result<Self, ListenError> {
        let bad = || ListenError::BadAddress(s.to_string());
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
            let cid = if cid == "-1" {
                libc::VMADDR_CID_ANY
            } else {
                cid.parse().map_err(|_| bad())?
            };
            let port = port.parse().map_err(|_| bad())?;
            return Ok(Self::Vsock { cid, port });
        }
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        Err(bad())
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Vsock { cid, port } if *cid == libc::VMADDR_CID_ANY => {
                write!(f, "vsock://-1:{port}")
            }
            Self::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

impl ListenAddr {
    /// The stdio stream listener that goes with this RPC listener: vsock port 1025
    /// (RPC + 1), or the Unix socket path with `.stream` appended.
    pub fn stream_addr(&self) -> ListenAddr {
        self.sibling(STREAM_VSOCK_PORT, STREAM_SOCKET_SUFFIX)
    }

    /// The port-forward listener that goes with this RPC listener: vsock port 1026
    /// (RPC + 2), or the Unix socket path with `.forward` appended.
    pub fn forward_addr(&self) -> ListenAddr {
        self.sibling(PORT_FORWARD_VSOCK_PORT, PORT_FORWARD_SOCKET_SUFFIX)
    }

    /// Another listener of the agent next to this one: vsock `port` on the same CID, or
    /// this Unix socket path with `suffix` appended.
    fn sibling(&self, port: u32, suffix: &str) -> ListenAddr {
        match self {
            Self::Vsock { cid, .. } => Self::Vsock { cid: *cid, port },
            Self::Unix(path) => {
                let mut name = path.clone().into_os_string();
                name.push(suffix);
                Self::Unix(PathBuf::from(name))
            }
        }
    }

    /// True for the guest's vsock listener.
    pub fn is_vsock(&self) -> bool {
        matches!(self, Self::Vsock { .. })
    }

    /// Creates a listening, close-on-exec socket bound to this address. A stale Unix socket
    /// file is replaced.
    pub fn bind(&self) -> Result<OwnedFd, ListenError> {
        let err = |source| ListenError::Bind {
            addr: self.to_string(),
            source,
        };
        let fd = match self {
            Self::Vsock { cid, port } => {
                let fd = socket(
                    AddressFamily::Vsock,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )
                .map_err(err)?;
                bind(fd.as_raw_fd(), &VsockAddr::new(*cid, *port)).map_err(err)?;
                fd
            }
            Self::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let fd = socket(
                    AddressFamily::Unix,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )
                .map_err(err)?;
                bind(fd.as_raw_fd(), &UnixAddr::new(path).map_err(err)?).map_err(err)?;
                fd
            }
        };
        listen(&fd, Backlog::new(32).map_err(err)?).map_err(err)?;
        Ok(fd)
    }
}

/// Whether a vsock peer of CID `cid` may talk to the agent: only the host. (The guest
/// kernel has no vsock loopback transport, which the kernel build asserts, so no guest
/// process can reach the agent's ports; this check holds even if one were added.)
pub fn peer_allowed(cid: u32) -> bool {
    cid == libc::VMADDR_CID_HOST
}

/// Accepts one connection (close-on-exec), retrying on EINTR. On vsock, a connection from
/// any peer but the host is closed and the next one awaited.
pub fn accept(listener: &OwnedFd, addr: &ListenAddr) -> Result<OwnedFd, ListenError> {
    loop {
        match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                if addr.is_vsock() {
                    let peer = nix::sys::socket::getpeername::<VsockAddr>(fd.as_raw_fd());
                    match peer {
                        Ok(p) if peer_allowed(p.cid()) => {}
                        other => {
                            log::warn!("{addr}: refused a connection from {other:?}: not the host");
                            continue;
                        }
                    }
                }
                return Ok(fd);
            }
            Err(nix::Error::EINTR) => continue,
            Err(source) => {
                return Err(ListenError::Accept {
                    addr: addr.to_string(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "vsock://-1:1024".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock {
                cid: libc::VMADDR_CID_ANY,
                port: 1024
            }
        );
        assert_eq!(
            "vsock://3:5".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock { cid: 3, port: 5 }
        );
        assert_eq!(
            "unix:///tmp/a.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/tmp/a.sock".into())
        );
        for bad in [
            "tcp://1:2",
            "vsock://x:1",
            "vsock://1",
            "unix://rel/path",
            "",
        ] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_the_host_is_a_peer() {
        assert!(peer_allowed(libc::VMADDR_CID_HOST));
        for cid in [0, 1, 3, 42, libc::VMADDR_CID_ANY] {
            assert!(!peer_allowed(cid), "{cid}");
        }
    }

    #[test]
    fn derives_stream_address() {
        let rpc: ListenAddr = "vsock://-1:1024".parse().unwrap();
        assert_eq!(rpc.stream_addr().to_string(), "vsock://-1:1025");
        let rpc: ListenAddr = "unix:///run/a.sock".parse().unwrap();
        assert_eq!(rpc.stream_addr().to_string(), "unix:///run/a.sock.stream");
    }
}
