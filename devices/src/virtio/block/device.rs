//! The virtio-blk device: configuration space, features, activation and reset.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use log::info;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::{Disk, DiskError, ID_BYTES};
use super::queue_handler::{Active, ActiveSlot, BlockHandler};
use super::request::{DiskLimits, SECTOR_SIZE};
use super::worker::{Worker, WorkerContext};
use super::{
    DISCARD_ALIGNMENT_SECTORS, MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, QUEUE_SIZE, SEG_MAX,
    SIZE_MAX,
};
use crate::virtio::features::{
    bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::virtio::persist::same;
use crate::virtio::{
    lock, read_config_bytes, ActivateError, DeviceState, DeviceSubscriber, FeatureSet, GuestMem,
    Interrupt, PersistError, QueuePosition, VirtioDevice,
};

/// Size of the part of `struct virtio_blk_config` the device fills (up to
/// `write_zeroes_may_unmap` and its padding).
const CONFIG_LEN: usize = 60;

/// How to build a block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// Raw disk image or block device.
    pub path: PathBuf,
    pub read_only: bool,
    /// Device ID seen by the guest (≤ 20 bytes); derived from the file if `None`.
    pub id: Option<String>,
}

/// Errors building a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("cannot create the queue event fd: {0}")]
    EventFd(std::io::Error),
}

/// The device's state (for snapshots and tests). A restored device must have the saved
/// capacity and read-only flag (the guest has read them); `path` and `id` are the source
/// VM's and only informative: a restore binds the device to this VM's disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub path: PathBuf,
    pub capacity: u64,
    pub read_only: bool,
    pub id: [u8; ID_BYTES],
    pub avail_features: u64,
    pub acked_features: u64,
    pub config: Vec<u8>,
    /// Its position in the queue while the device is active.
    pub queues: Option<Vec<QueuePosition>>,
}

/// A virtio-blk device.
pub struct Block {
    disk: Arc<Disk>,
    features: FeatureSet,
    config: [u8; CONFIG_LEN],
    queue_events: Vec<EventFd>,
    active: ActiveSlot,
    handler: Arc<Mutex<BlockHandler>>,
}

impl Block {
    /// Opens the disk and builds the device.
    pub fn new(cfg: &BlockConfig) -> Result<Block, BlockError> {
        let disk = Disk::open(&cfg.path, cfg.read_only, cfg.id.as_deref())?;
        let kick = EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?;
        let active: ActiveSlot = Arc::new(Mutex::new(None));
        let handler = BlockHandler::new(
            kick.try_clone().map_err(BlockError::EventFd)?,
            active.clone(),
        );

        let mut avail_features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH);
        if disk.read_only() {
            avail_features |= bit(VIRTIO_BLK_F_RO);
        }
        if disk.supports_discard() {
            avail_features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let config = config_space(disk.capacity());
        Ok(Block {
            disk: Arc::new(disk),
            features: FeatureSet::new(avail_features),
            config,
            queue_events: vec![kick],
            active,
            handler: Arc::new(Mutex::new(handler)),
        })
    }

    /// The event-loop handler (also reachable as [`VirtioDevice::subscriber`]).
    pub fn handler(&self) -> Arc<Mutex<BlockHandler>> {
        self.handler.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    /// The device's state.
    pub fn state(&self) -> BlockState {
        let queues = lock(&self.active)
            .as_ref()
            .map(|a| vec![QueuePosition::of(&lock(&a.queue))]);
        BlockState {
            path: self.disk.path().into(),
            capacity: self.disk.capacity(),
            read_only: self.disk.read_only(),
            id: *self.disk.id(),
            avail_features: self.features.avail(),
            acked_features: self.features.acked(),
            config: self.config.to_vec(),
            queues,
        }
    }

    fn stop(&mut self) {
        let active = lock(&self.active).take();
        if let Some(mut active) = active {
            active.worker.stop();
        }
    }
}

/// `struct virtio_blk_config` (little-endian) for a disk of `capacity` sectors.
fn config_space(capacity: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put =
        |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(0, &capacity.to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &1u32.to_le_bytes()); // max_discard_seg
    put(44, &DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
    put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn features(&self) -> &FeatureSet {
        &self.features
    }

    fn features_mut(&mut self) -> &mut FeatureSet {
        &mut self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing is writable without VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
        log::warn!(
            "virtio-blk: guest wrote {} bytes at config offset {offset:#x}; the config space is read-only, ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<Interrupt>,
        mut queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let mut slot = lock(&self.active);
        if slot.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let queue = Arc::new(Mutex::new(queues.remove(0)));
        let worker = Worker::spawn(WorkerContext {
            disk: self.disk.clone(),
            mem: mem.clone(),
            queue: queue.clone(),
            interrupt: interrupt.clone(),
        })
        .map_err(ActivateError::Worker)?;
        let acked = self.features.acked();
        *slot = Some(Active {
            mem,
            queue,
            interrupt,
            limits: DiskLimits {
                capacity: self.disk.capacity(),
                read_only: self.disk.read_only(),
                discard: acked & bit(VIRTIO_BLK_F_DISCARD) != 0,
                write_zeroes: acked & bit(VIRTIO_BLK_F_WRITE_ZEROES) != 0,
            },
            worker,
        });
        drop(slot);
        info!("virtio-blk: {} active", self.disk.path().display());
        // Serve anything the driver queued before DRIVER_OK.
        if let Err(e) = self.queue_events[0].write(1) {
            log::warn!("virtio-blk: cannot kick the queue after activation: {e}");
        }
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop();
        self.features.clear_acked();
        true
    }

    fn subscriber(&self) -> DeviceSubscriber {
        self.handler.clone()
    }

    fn save(&self) -> DeviceState {
        DeviceState::Block(self.state())
    }

    fn check_restore(&self, saved: &DeviceState) -> Result<(), PersistError> {
        let current = self.state();
        let DeviceState::Block(s) = saved else {
            return saved.same_kind(&DeviceState::Block(current));
        };
        same(
            "virtio-blk",
            "capacity (sectors)",
            &s.capacity,
            &current.capacity,
        )?;
        same(
            "virtio-blk",
            "read-only flag",
            &s.read_only,
            &current.read_only,
        )
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop();
    }
}
