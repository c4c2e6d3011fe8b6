//! virtio-vsock with the host side in this process: guest `AF_VSOCK` stream sockets become
//! host Unix stream sockets, in Firecracker's "hybrid vsock" model. No vhost, no helper
//! process: the device runs on the VMM's event loop.
//!
//! ## For the VMM
//! * Build it with [`Vsock::new`]`(guest_cid, uds_path)` (e.g. CID 3,
//!   `/run/podvisor/<sandbox>/vsock.sock`). It binds `uds_path` at once (replacing a stale
//!   socket file, refusing a live one or a non-socket file) and removes it when dropped.
//! * Put it behind a [`MmioTransport`](crate::virtio::MmioTransport) like any virtio device
//!   (type 19, three queues: rx 0, tx 1, event 2) and add its subscriber to the event loop;
//!   the subscriber watches the listening socket and every stream's socket itself.
//!
//! ## Socket conventions
//! * Host → guest: connect to `uds_path`, write `CONNECT <guest port>\n`, read `OK <host
//!   port>\n`; then the socket is the stream. If the guest has no listener on that port (or
//!   does not answer within [`Timeouts::request`]) the socket is closed instead.
//! * Guest → host: a guest connect to CID 2 (the host), port `P`, is connected to the Unix
//!   socket `<uds_path>_P` (e.g. `vsock.sock_1024`); if nobody accepts there the guest gets
//!   `ECONNRESET`.
//! * Closing: EOF on either side is passed on as a half-close (SHUTDOWN); when neither side
//!   can send any more the stream is reset and the host socket closed.
//!
//! ## Modules
//! * [`device`]: the [`Vsock`] device — config space (`guest_cid`), features, activation,
//!   reset, state.
//! * [`queue_handler`]: the event-loop subscriber — queue kicks, socket events, timer.
//! * [`muxer`]: the Unix-socket back end — listener, `CONNECT` lines, streams by port pair,
//!   RX scheduling, deadlines, fd registration.
//! * [`connection`]: one stream's state machine and credit-based flow control.
//! * [`packet`]: the packet header and protocol constants (parsing of descriptor chains is
//!   `virtio_vsock::packet::VsockPacket`'s).
//! * `txbuf`, [`uds`]: the bounded guest→host buffer; socket helpers.
//!
//! ## Against a hostile guest
//! Chains that do not parse (header in a short or device-writable descriptor, a payload
//! longer than its descriptor or than [`MAX_PKT_DATA`], addresses outside guest memory) are
//! returned unread with a warning, and the stream they name, if any, is reset. Packets with
//! a foreign source CID or for a CID other than the host's are dropped; a socket type other
//! than STREAM, an unknown operation, a payload on a control packet or data beyond the
//! credit the device gave are answered with RST. Memory per stream is bounded by
//! [`CONN_BUF_ALLOC`], streams by [`MAX_CONNECTIONS`], owed RST packets by
//! [`MAX_PENDING_RST`]; a broken available ring puts the device into `DEVICE_NEEDS_RESET`.
//!
//! ## Snapshots
//! [`Vsock::state`] is the configuration only. Streams live in host sockets and are not
//! saved: after a restore the guest must see a transport reset and reconnect.

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;
pub mod queue_handler;
mod txbuf;
pub mod uds;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use device::{Vsock, VsockError, VsockState};
pub use queue_handler::VsockHandler;
pub use uds::UdsError;

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Number of queues: rx, tx, event.
pub const NUM_QUEUES: usize = 3;
/// Host → guest packets.
pub const RXQ: usize = 0;
/// Guest → host packets.
pub const TXQ: usize = 1;
/// Device events (transport reset); unused by this device.
pub const EVQ: usize = 2;

/// Receive buffer the device offers each stream (`buf_alloc`): the most guest bytes a
/// stream may have waiting for a slow host peer.
pub const CONN_BUF_ALLOC: u32 = 256 << 10;
/// A credit update goes to the guest once this many bytes were forwarded since the last one
/// it heard of.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 << 10;
/// Largest payload of one packet, either way (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_DATA: u32 = 64 << 10;
/// Most streams (plus host clients still sending `CONNECT`) per device.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most RST packets waiting for guest receive buffers.
pub const MAX_PENDING_RST: usize = 1024;

/// How long the device waits for the other side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// For a host client's `CONNECT <port>\n` line after it connected.
    pub connect_line: Duration,
    /// For the guest's answer to a host-initiated REQUEST.
    pub request: Duration,
    /// For the host peer to read the guest's last bytes once a stream is closed both ways.
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_line: Duration::from_secs(10),
            request: Duration::from_secs(5),
            shutdown: Duration::from_secs(3),
        }
    }
}
