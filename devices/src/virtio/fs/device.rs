//! The virtio-fs device: configuration space (tag, queue count), features, activation,
//! reset and state.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use log::{info, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::{ConfigError, ShareConfig, ShareOptions, TAG_LEN};
use super::queue_handler::{Active, ActiveSlot, FsHandler};
use super::worker::{Worker, WorkerContext, WorkerError};
use super::{NUM_QUEUES, NUM_REQUEST_QUEUES, QUEUE_SIZE};
use crate::virtio::features::{
    bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::virtio::persist::same;
use crate::virtio::{
    lock, read_config_bytes, ActivateError, DeviceState, DeviceSubscriber, FeatureSet, GuestMem,
    Interrupt, PersistError, QueuePosition, VirtioDevice,
};

/// `struct virtio_fs_config`: `char tag[36]` + `le32 num_request_queues`.
pub const CONFIG_LEN: usize = TAG_LEN + 4;

/// Errors building a virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create a queue event fd: {0}; check the process's file descriptor limit")]
    EventFd(std::io::Error),
}

/// The device's state, for snapshots and tests.
///
/// Only the configuration and the virtio state are recorded. The FUSE session — the inodes
/// the guest looked up and the files and directories it has open — lives in the worker and
/// is not snapshotted: a restored guest that still has the share mounted sees stale node
/// IDs (`EBADF`/`ENOENT`) until it remounts. Unmount shares before taking a template, or
/// snapshot the session once fuse-backend-rs' `persist` support is wired in.
///
/// A restored device must have the saved tag; `dir` and `options` are the source VM's and
/// only informative: a restore serves this VM's directory with this VM's options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    pub tag: String,
    pub dir: PathBuf,
    pub options: ShareOptions,
    pub avail_features: u64,
    pub acked_features: u64,
    /// Its positions in the queues (hiprio, request) while the device is active.
    pub queues: Option<Vec<QueuePosition>>,
}

/// A virtio-fs device serving one share.
pub struct Fs {
    share: ShareConfig,
    features: FeatureSet,
    config: [u8; CONFIG_LEN],
    queue_events: Vec<EventFd>,
    active: ActiveSlot,
    handler: Arc<Mutex<FsHandler>>,
}

impl Fs {
    /// Builds the device for `share` (checked again: tag and directory). The file system is
    /// opened when the driver activates the device.
    pub fn new(share: ShareConfig) -> Result<Fs, FsError> {
        let share = ShareConfig::new(&share.tag, &share.dir, share.options)?;
        let mut queue_events = Vec::with_capacity(NUM_QUEUES);
        let mut kicks = Vec::with_capacity(NUM_QUEUES);
        for _ in 0..NUM_QUEUES {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd)?;
            kicks.push(evt.try_clone().map_err(FsError::EventFd)?);
            queue_events.push(evt);
        }
        let active: ActiveSlot = Arc::new(Mutex::new(None));
        let handler = FsHandler::new(share.tag.clone(), kicks, active.clone());
        let mut config = [0u8; CONFIG_LEN];
        config[..TAG_LEN].copy_from_slice(&share.tag_bytes());
        config[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        Ok(Fs {
            share,
            features: FeatureSet::new(
                bit(VIRTIO_F_VERSION_1)
                    | bit(VIRTIO_RING_F_INDIRECT_DESC)
                    | bit(VIRTIO_RING_F_EVENT_IDX),
            ),
            config,
            queue_events,
            active,
            handler: Arc::new(Mutex::new(handler)),
        })
    }

    /// The share's tag.
    pub fn tag(&self) -> &str {
        &self.share.tag
    }

    /// The share this device serves.
    pub fn share(&self) -> &ShareConfig {
        &self.share
    }

    /// The event-loop handler (also reachable as [`VirtioDevice::subscriber`]).
    pub fn handler(&self) -> Arc<Mutex<FsHandler>> {
        self.handler.clone()
    }

    /// The device's state (see [`FsState`] for what is not in it).
    pub fn state(&self) -> FsState {
        let queues = lock(&self.active).as_ref().map(|a| {
            a.queues
                .iter()
                .map(|q| QueuePosition::of(&lock(q)))
                .collect()
        });
        FsState {
            tag: self.share.tag.clone(),
            dir: self.share.dir.clone(),
            options: self.share.options,
            avail_features: self.features.avail(),
            acked_features: self.features.acked(),
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

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
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
        warn!(
            "virtio-fs {}: guest wrote {} bytes at config offset {offset:#x}; the config space is read-only, ignored",
            self.share.tag,
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: queues.len(),
            });
        }
        if lock(&self.active).is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        // The worker opens the share before this returns; the slot is not locked meanwhile,
        // so the event loop never waits on the file system. The transport's lock keeps
        // activate and reset from running concurrently.
        let queues: Vec<_> = queues
            .into_iter()
            .map(|q| Arc::new(Mutex::new(q)))
            .collect();
        let worker = Worker::spawn(WorkerContext {
            share: self.share.clone(),
            mem,
            queues: queues.clone(),
            interrupt: interrupt.clone(),
        })
        .map_err(|e| match e {
            WorkerError::Spawn(e) => ActivateError::Worker(e),
            other => ActivateError::Backend(other.to_string()),
        })?;
        // Serve anything the driver queued before DRIVER_OK.
        worker.kick();
        *lock(&self.active) = Some(Active {
            queues,
            interrupt,
            worker,
        });
        info!(
            "virtio-fs {}: serving {} ({})",
            self.share.tag,
            self.share.dir.display(),
            if self.share.options.read_only {
                "read-only"
            } else {
                "read-write"
            }
        );
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
        DeviceState::Fs(self.state())
    }

    fn check_restore(&self, saved: &DeviceState) -> Result<(), PersistError> {
        let DeviceState::Fs(s) = saved else {
            return saved.same_kind(&self.save());
        };
        same("virtio-fs", "tag", &s.tag, &self.share.tag)
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.stop();
    }
}
