//! Saved state of virtio devices, for snapshots (Firecracker's `persist` split).
//!
//! [`MmioTransport::save`](super::MmioTransport::save) records a device as an
//! [`MmioPersist`]: the transport's registers ([`MmioState`]) and the device's own
//! [`DeviceState`] — identity (disk size, share tag, guest CID), host paths (information
//! only), offered and accepted features and, while the driver has it running, every queue's
//! addresses and ring positions ([`QueuePersist`]).
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

use std::num::Wrapping;

use super::block::BlockState;
use super::fs::FsState;
use super::mmio::MmioState;
use super::vsock::VsockState;
use super::{ActivateError, GuestMem};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

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

/// One queue while the device runs: where the driver put it and where the device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePersist {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// The next available-ring entry the device will pop.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    pub event_idx: bool,
}

impl QueuePersist {
    /// The state of a live queue.
    pub fn of(queue: &Queue) -> Self {
        Self::from(queue.state())
    }

    /// Chains popped and not yet returned (0 at a quiescent point).
    pub fn in_flight(&self) -> u16 {
        (Wrapping(self.next_avail) - Wrapping(self.next_used)).0
    }

    /// The live queue again, checked against `mem` (a snapshot file is input like any
    /// other: a queue outside guest memory is refused, not trusted).
    pub fn to_queue(&self, mem: &GuestMem) -> Result<Queue, String> {
        let mut q = Queue::try_from(QueueState::from(*self)).map_err(|e| e.to_string())?;
        q.set_ready(self.ready);
        if !q.is_valid(mem) {
            return Err(format!(
                "rings (desc {:#x}, avail {:#x}, used {:#x}, size {}) are not inside guest memory",
                self.desc_table, self.avail_ring, self.used_ring, self.size
            ));
        }
        Ok(q)
    }
}

impl From<QueueState> for QueuePersist {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl From<QueuePersist> for QueueState {
    fn from(p: QueuePersist) -> Self {
        QueueState {
            max_size: p.max_size,
            next_avail: p.next_avail,
            next_used: p.next_used,
            event_idx_enabled: p.event_idx,
            size: p.size,
            ready: p.ready,
            desc_table: p.desc_table,
            avail_ring: p.avail_ring,
            used_ring: p.used_ring,
        }
    }
}

/// A device's own saved state, by kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Block(BlockState),
    Fs(FsState),
    Vsock(VsockState),
    /// A device with no state of its own beyond features and queues (tests).
    Generic {
        device_type: u32,
        avail_features: u64,
        acked_features: u64,
        queues: Option<Vec<QueuePersist>>,
    },
}

impl DeviceState {
    /// The kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Block(_) => "virtio-blk",
            DeviceState::Fs(_) => "virtio-fs",
            DeviceState::Vsock(_) => "virtio-vsock",
            DeviceState::Generic { .. } => "generic virtio",
        }
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        match self {
            DeviceState::Block(s) => s.acked_features,
            DeviceState::Fs(s) => s.acked_features,
            DeviceState::Vsock(s) => s.acked_features,
            DeviceState::Generic { acked_features, .. } => *acked_features,
        }
    }

    /// The live queues, if the device was running.
    pub fn queues(&self) -> Option<&[QueuePersist]> {
        match self {
            DeviceState::Block(s) => s.queues.as_deref(),
            DeviceState::Fs(s) => s.queues.as_deref(),
            DeviceState::Vsock(s) => s.queues.as_deref(),
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
            .map(QueuePersist::in_flight)
            .enumerate()
            .find(|&(_, n)| n != 0)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    #[test]
    fn queue_round_trip_and_checks() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.try_set_desc_table_address(GuestAddress(0x1000)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(0x2000)).unwrap();
        q.try_set_used_ring_address(GuestAddress(0x3000)).unwrap();
        q.set_ready(true);
        q.set_next_avail(7);
        q.set_next_used(5);
        let p = QueuePersist::of(&q);
        assert_eq!(p.in_flight(), 2);
        let back = p.to_queue(&mem).unwrap();
        assert_eq!(QueuePersist::of(&back), p);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<QueuePersist>(&json).unwrap(), p);

        let outside = QueuePersist {
            used_ring: 0x10_0000,
            ..p
        };
        assert!(outside.to_queue(&mem).unwrap_err().contains("not inside"));
        let bad_size = QueuePersist { size: 3, ..p };
        assert!(bad_size.to_queue(&mem).is_err());
        let wrapped = QueuePersist {
            next_avail: 1,
            next_used: u16::MAX,
            ..p
        };
        assert_eq!(wrapped.in_flight(), 2);
    }
}
