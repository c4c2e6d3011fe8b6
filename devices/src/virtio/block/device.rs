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

use super::disk::{Disk, DiskError, ID_BYTES};
use super::queue_handler::{Active, BlockHandler};
use super::request::{DiskLimits, SECTOR_SIZE};
use super::worker::{Worker, WorkerContext};
use super::{
    DISCARD_ALIGNMENT_SECTORS, MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, QUEUE_SIZE, SEG_MAX,
    SIZE_MAX,
};
use crate::virtio::common::{common_accessors, HasCore, VirtioCommon};
use crate::virtio::features::{
    bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::virtio::persist::same;
use crate::virtio::{
    lock, read_config_bytes, ActivateError, DeviceState, GuestMem, Interrupt, PersistError,
    QueuePosition, VirtioDevice,
};

/// Size of the part of `struct virtio_blk_config` the device fills (up to
/// `write_zeroes_may_unmap` and its padding).
const CONFIG_LEN: usize = 60;
/// `blk_size` in the config space: the sector size.
const BLK_SIZE: u32 = crate::virtio::const_u32(SECTOR_SIZE);

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
    common: VirtioCommon,
    disk: Arc<Disk>,
    config: [u8; CONFIG_LEN],
    handler: Arc<Mutex<BlockHandler>>,
}

impl Block {
    /// Opens the disk and builds the device.
    pub fn new(cfg: &BlockConfig) -> Result<Block, BlockError> {
        let disk = Disk::open(&cfg.path, cfg.read_only, cfg.id.as_deref())?;
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
        let (common, handler) = VirtioCommon::with_handler(
            "virtio-blk",
            VIRTIO_ID_BLOCK,
            &[QUEUE_SIZE],
            avail_features,
            BlockHandler::new,
        )
        .map_err(BlockError::EventFd)?;
        let config = config_space(disk.capacity());
        Ok(Block {
            common,
            disk: Arc::new(disk),
            config,
            handler,
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
        let queues = lock(&self.handler).core().queue_positions();
        BlockState {
            path: self.disk.path().into(),
            capacity: self.disk.capacity(),
            read_only: self.disk.read_only(),
            id: *self.disk.id(),
            avail_features: self.common.features().avail(),
            acked_features: self.common.features().acked(),
            config: self.config.to_vec(),
            queues,
        }
    }

    /// Stops the worker (outside the handler's lock: joining it waits for a request).
    fn stop(&mut self) {
        let stopped = lock(&self.handler).core_mut().reset();
        if let Some(mut active) = stopped {
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
    put(20, &BLK_SIZE.to_le_bytes());
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &1u32.to_le_bytes()); // max_discard_seg
    put(44, &DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
    put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    common_accessors!(common);

    // Nothing is writable without VIRTIO_BLK_F_CONFIG_WCE, which is not offered: the default
    // `write_config` ignores writes.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<Interrupt>,
        mut queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.common.check_queues(&queues)?;
        let mut handler = lock(&self.handler);
        handler.core().check_idle()?;
        let queue = Arc::new(Mutex::new(queues.remove(0)));
        let worker = Worker::spawn(WorkerContext {
            disk: self.disk.clone(),
            mem: mem.clone(),
            queue: queue.clone(),
            interrupt: interrupt.clone(),
        })
        .map_err(ActivateError::Worker)?;
        let acked = self.common.features().acked();
        // Wakes the handler to serve anything the driver queued before DRIVER_OK.
        handler.core_mut().activate(Active {
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
        info!("virtio-blk: {} active", self.disk.path().display());
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop();
        true
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
