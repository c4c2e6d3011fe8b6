//! virtio-net on a host tap device, in this process: no vhost, no helper. The device runs
//! on the VMM's event loop and moves frames between the guest's queues and the tap with
//! one `readv`/`writev` each, straight from and into guest memory.
//!
//! ## For the VMM
//! * Build it with [`Net::new`]`(&`[`NetConfig`]`)`: a [`TapSource`] (a tap name in this
//!   process's network namespace, or an fd the caller opened — the shim opens the tap in
//!   the pod's namespace), an optional MAC (random, locally administered, if `None`) and
//!   MTU (1500).
//! * Put it behind a [`MmioTransport`](crate::virtio::MmioTransport) like any virtio device
//!   (type 1, two queues: rx 0, tx 1) and add its subscriber to the event loop; the
//!   subscriber watches the tap itself.
//!
//! ## Features
//! `VERSION_1`, `INDIRECT_DESC`, `EVENT_IDX`, `MAC`, `MTU`, `STATUS` (link always up),
//! `MRG_RXBUF`, and — when the tap accepts `TUNSETOFFLOAD` — `CSUM`, `GUEST_CSUM`,
//! `GUEST_TSO4/6`, `HOST_TSO4/6`. The tap is opened with `IFF_VNET_HDR` and a 12-byte
//! header, the same `virtio_net_hdr_v1` the guest uses, so offload metadata passes through
//! untouched; at activation `TUNSETOFFLOAD` is set from what the guest *accepted*
//! ([`tap::offload_flags`]), so the host kernel never hands the guest a partial checksum or
//! a TSO frame it did not ask for. No control queue, no multiqueue.
//!
//! ## Modules
//! * [`device`]: the [`Net`] device — config space (MAC, status, MTU), features, activation,
//!   reset, [`NetState`].
//! * [`queue_handler`]: the event-loop subscriber — tap readable → rx, kicks, wake-ups; the
//!   tap is unwatched while the guest has no receive buffers.
//! * [`rx`]: tap → guest, mergeable receive buffers. [`tx`]: guest → tap.
//! * [`header`]: `virtio_net_hdr_v1` and the checks of the guest's transmit headers.
//! * [`buffers`]: descriptor chains as checked guest-memory slices and iovecs.
//! * [`tap`]: opening and configuring the tap.
//!
//! ## Against a hostile guest
//! Nothing a guest writes panics the process or stalls the loop: transmit chains that are
//! not a frame (wrong direction, outside memory, shorter than the headers, longer than
//! [`MAX_FRAME_LEN`] + header, more than [`MAX_IOVECS`] pieces, a header asking for
//! offloads not negotiated) are dropped and returned with length 0; unusable receive
//! chains are returned with length 0; descriptor loops end at the queue size (virtio-queue
//! stops there); a broken available ring puts the device into `DEVICE_NEEDS_RESET`. Every
//! such drop is logged at warn, at most once a second ([`RateLimitedWarn`]).
//!
//! ## Snapshots
//! [`NetState`] holds the MAC, MTU, features and queue positions; no frame is ever held by
//! the device between events (receive chains are popped and put back within one event), so
//! any point where the event loop is not inside the handler is quiescent. A restored
//! device gets its tap from the restore configuration; the frames in flight in the old
//! tap are lost, as on a real link.

pub mod buffers;
pub mod device;
pub mod header;
pub mod queue_handler;
pub mod rx;
pub mod tap;
pub mod tx;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_net;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

pub use device::{format_mac, parse_mac, random_mac, Net, NetConfig, NetError, NetState};
pub use queue_handler::{NetHandler, NetStats};
pub use tap::{Tap, TapError, TapSource};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Number of queues: rx, tx.
pub const NUM_QUEUES: usize = 2;
/// Host → guest frames.
pub const RXQ: usize = 0;
/// Guest → host frames.
pub const TXQ: usize = 1;

/// `struct virtio_net_hdr_v1` (with `num_buffers`): in front of every frame, both ways.
pub const HDR_LEN: usize = 12;
/// Ethernet header.
pub const ETH_HLEN: usize = 14;
/// An 802.1Q tag.
pub const VLAN_HLEN: usize = 4;
/// Largest frame after the header: a 64 KiB TSO segment with its headers (what
/// Firecracker and QEMU allow).
pub const MAX_FRAME_LEN: usize = 65550;
/// Most pieces one frame's buffers may have (`UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;
/// The MTU when none is configured.
pub const DEFAULT_MTU: u16 = 1500;
/// Smallest MTU (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// Largest MTU: a frame must fit [`MAX_FRAME_LEN`].
pub const MAX_MTU: u16 = {
    use crate::virtio::{const_u16, const_u32};
    const_u16(const_u32((MAX_FRAME_LEN - ETH_HLEN - VLAN_HLEN) as u64))
};

/// Frames received per wake-up before yielding to the loop's other subscribers (the tap
/// stays readable, so the loop comes back).
pub const RX_BUDGET: usize = 64;
/// Chains transmitted per wake-up before yielding.
pub const TX_BUDGET: usize = 256;

/// A warning that a guest can trigger on every frame, logged at most once per interval
/// with the number of those suppressed in between.
#[derive(Debug)]
pub struct RateLimitedWarn {
    what: &'static str,
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedWarn {
    /// At most one warning a second, prefixed with `what`.
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            interval: Duration::from_secs(1),
            last: None,
            suppressed: 0,
        }
    }

    /// Logs `msg` unless a warning was logged less than the interval ago. Returns whether
    /// it was logged.
    pub fn warn(&mut self, msg: std::fmt::Arguments) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.interval)
        {
            self.suppressed += 1;
            return false;
        }
        if self.suppressed > 0 {
            log::warn!(
                "{}: {msg} ({} similar warning(s) suppressed)",
                self.what,
                self.suppressed
            );
        } else {
            log::warn!("{}: {msg}", self.what);
        }
        self.last = Some(now);
        self.suppressed = 0;
        true
    }

    /// Warnings suppressed since the last one logged.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod warn_tests {
    use super::RateLimitedWarn;

    #[test]
    fn warnings_are_rate_limited_and_counted() {
        let mut w = RateLimitedWarn::new("test");
        assert!(w.warn(format_args!("first")));
        assert!(!w.warn(format_args!("second")));
        assert!(!w.warn(format_args!("third")));
        assert_eq!(w.suppressed(), 2);
        w.last = w.last.map(|t| t - w.interval);
        assert!(w.warn(format_args!("after the interval")));
        assert_eq!(w.suppressed(), 0);
    }
}
