//! Saved state of virtio devices, for snapshots (Firecracker's `persist` split).
//!
//! [`MmioTransport::save`](super::MmioTransport::save) records a device as an
//! [`MmioPersist`]: the transport's registers ([`MmioState`]) and the device's own
//! [`DeviceState`] — identity (disk size, share tag, guest CID, MAC and MTU), host paths (information
//! only), offered and accepted features and, while the driver has it running, its position
//! in every queue ([`QueuePosition`]).
//!
//! [`MmioTransport::restore`](super::MmioTransport::restore) puts that back on a device
//! freshly built for *this* VM's host resources (the pod's disk image, share directory,
//! vsock socket): the device checks that it is the same kind of device with the same
//! guest-visible identity ([`VirtioDevice::check_restore`](super::VirtioDevice)), the
//! transport restores the registers and accepted features, and a running device is
//! activated again with its queues where they were, then told it was restored (vsock sends
//! the guest a transport reset). A saved pending interrupt is raised again: a spurious
//! interrupt costs a virtio driver one look at its rings, a lost one can stall it.
//!
//! What is not saved, by design: host-side sessions (vsock streams, the virtio-fs FUSE
//! session). Snapshots are taken at a quiescent point — no request popped from a ring and
//! not yet completed ([`MmioPersist::in_flight`] says which queue is not) — so no
//! request is lost or served twice.
//!
//! The saved transport registers ([`MmioState`], [`QueueRegs`]) are defined here with the
//! rest of the saved state, so the dependency goes one way: the transport uses this module,
//! this module knows nothing of the transport.

use std::num::Wrapping;

use super::balloon::BalloonState;
use super::block::BlockState;
use super::fs::FsState;
use super::net::NetState;
use super::vsock::VsockState;
use super::ActivateError;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

/// Why saved device state cannot be put back.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("the snapshot has a {saved} device where this VM has a {current} device: give the restored VM the same devices, in the same order")]
    Kind {
        saved: &'static str,
        current: &'static str,
    },
    #[error("{device}: saved {what} {saved}, this VM's is {current}; the guest already knows the saved one, so the device must match it")]
    Identity {
        device: &'static str,
        what: &'static str,
        saved: String,
        current: String,
    },
    #[error(
        "{device}: the driver accepted features {acked:#x}, this device offers only {offered:#x}"
    )]
    Features {
        device: &'static str,
        acked: u64,
        offered: u64,
    },
    #[error("the saved transport has {saved} queues, the device has {current}")]
    QueueCount { saved: usize, current: usize },
    #[error("queue {index}: {reason}")]
    Queue { index: usize, reason: String },
    #[error("the saved device is running but its queue state is missing")]
    MissingQueues,
    #[error("cannot restart the device: {0}")]
    Activate(#[from] ActivateError),
}

/// Where a running device is in one of its queues. The rest of the queue (size, ring
/// addresses) is what the driver wrote to the transport ([`MmioState::queues`]), and is
/// checked again against guest memory on restore like at `DRIVER_OK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePosition {
    /// The next available-ring entry the device will pop.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
}

impl QueuePosition {
    /// The position in a live queue.
    pub fn of(queue: &Queue) -> Self {
        Self {
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
    }

    /// Chains popped and not yet returned (0 at a quiescent point).
    pub fn in_flight(&self) -> u16 {
        (Wrapping(self.next_avail) - Wrapping(self.next_used)).0
    }
}

/// A device's own saved state, by kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Block(BlockState),
    Fs(FsState),
    Vsock(VsockState),
    Net(NetState),
    Balloon(BalloonState),
    /// A device with no state of its own beyond features and queues (tests).
    Generic {
        device_type: u32,
        avail_features: u64,
        acked_features: u64,
        queues: Option<Vec<QueuePosition>>,
    },
}

impl DeviceState {
    /// The kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Block(_) => "virtio-blk",
            DeviceState::Fs(_) => "virtio-fs",
            DeviceState::Vsock(_) => "virtio-vsock",
            DeviceState::Net(_) => "virtio-net",
            DeviceState::Balloon(_) => "virtio-balloon",
            DeviceState::Generic { .. } => "generic virtio",
        }
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        match self {
            DeviceState::Block(s) => s.acked_features,
            DeviceState::Fs(s) => s.acked_features,
            DeviceState::Vsock(s) => s.acked_features,
            DeviceState::Net(s) => s.acked_features,
            DeviceState::Balloon(s) => s.acked_features,
            DeviceState::Generic { acked_features, .. } => *acked_features,
        }
    }

    /// The live queues, if the device was running.
    pub fn queues(&self) -> Option<&[QueuePosition]> {
        match self {
            DeviceState::Block(s) => s.queues.as_deref(),
            DeviceState::Fs(s) => s.queues.as_deref(),
            DeviceState::Vsock(s) => s.queues.as_deref(),
            DeviceState::Net(s) => s.queues.as_deref(),
            DeviceState::Balloon(s) => s.queues.as_deref(),
            DeviceState::Generic { queues, .. } => queues.as_deref(),
        }
    }

    /// [`PersistError::Kind`] unless `self` is the same kind as `current`.
    pub fn same_kind(&self, current: &DeviceState) -> Result<(), PersistError> {
        if std::mem::discriminant(self) == std::mem::discriminant(current) {
            Ok(())
        } else {
            Err(PersistError::Kind {
                saved: self.kind(),
                current: current.kind(),
            })
        }
    }
}

/// Checks that a saved guest-visible property equals the current one.
pub fn same<T: PartialEq + std::fmt::Debug>(
    device: &'static str,
    what: &'static str,
    saved: &T,
    current: &T,
) -> Result<(), PersistError> {
    if saved == current {
        Ok(())
    } else {
        Err(PersistError::Identity {
            device,
            what,
            saved: format!("{saved:?}"),
            current: format!("{current:?}"),
        })
    }
}

/// What the driver wrote for one queue (the transport validates it at DRIVER_OK).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// The transport's register state (for snapshots and tests).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueRegs>,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    pub config_generation: u32,
}

/// A virtio-mmio device as a snapshot holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioPersist {
    pub transport: MmioState,
    pub device: DeviceState,
}

impl MmioPersist {
    /// The first queue (index, count) with chains popped but not returned, if any.
    pub fn in_flight(&self) -> Option<(usize, u16)> {
        self.device
            .queues()?
            .iter()
            .map(QueuePosition::in_flight)
            .enumerate()
            .find(|&(_, n)| n != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_chains_in_flight_across_the_wrap() {
        let mut q = Queue::new(16).unwrap();
        q.set_next_avail(7);
        q.set_next_used(5);
        let p = QueuePosition::of(&q);
        assert_eq!((p.next_avail, p.next_used, p.in_flight()), (7, 5, 2));
        let wrapped = QueuePosition {
            next_avail: 1,
            next_used: u16::MAX,
        };
        assert_eq!(wrapped.in_flight(), 2);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<QueuePosition>(&json).unwrap(), p);
    }
}
