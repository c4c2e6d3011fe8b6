//! The guest end of port forwarding (CRI PortForward): each connection on the port-forward
//! listener names a TCP port (2 bytes, big-endian) and is then joined to a connection to
//! `127.0.0.1:<port>` in the VM, which is the pod's network namespace. The shim steers
//! containerd's dial in the pod's host namespace onto such a connection
//! (`podvisor_shim::net::forward`).
//!
//! Only the host reaches the listener (vsock peers are checked as for the other ports).
//! A port nobody listens on closes the connection, which containerd reports to its client.

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::listener::{self, ListenAddr};
use crate::stream::spawn_small;

/// How long a new connection may take to name its port.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts port-forward connections on `listener` in a thread, for the agent's lifetime.
pub fn serve(listener: OwnedFd, addr: ListenAddr) -> io::Result<()> {
    spawn_small("forward-accept".into(), move || loop {
        match listener::accept(&listener, &addr) {
            Ok(conn) => {
                // A stream socket of either family (vsock, Unix): read, write and shutdown
                // are the same calls.
                let conn = UnixStream::from(conn);
                if let Err(e) = spawn_small("forward".into(), move || {
                    if let Err(e) = carry(conn) {
                        log::debug!("port forward: {e}");
                    }
                }) {
                    log::warn!("port forward: no thread for a connection: {e}");
                }
            }
            Err(err) => {
                log::error!("{err}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    })
}

/// Joins `conn` to the guest port it names until both directions are done.
fn carry(mut conn: UnixStream) -> io::Result<()> {
    conn.set_read_timeout(Some(HEADER_TIMEOUT))?;
    let mut port = [0u8; 2];
    conn.read_exact(&mut port)?;
    conn.set_read_timeout(None)?;
    let port = u16::from_be_bytes(port);
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| io::Error::new(e.kind(), format!("127.0.0.1:{port}: {e}")))?;
    let (mut tcp_in, mut conn_out) = (tcp.try_clone()?, conn.try_clone()?);
    let (mut tcp_out, mut conn_in) = (tcp, conn);
    spawn_small(format!("forward-{port}"), move || {
        let _ = io::copy(&mut conn_in, &mut tcp_in);
        let _ = tcp_in.shutdown(Shutdown::Write);
    })?;
    let _ = io::copy(&mut tcp_out, &mut conn_out);
    let _ = conn_out.shutdown(Shutdown::Write);
    Ok(())
}
