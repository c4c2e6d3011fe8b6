//! The virtio-fs device: configuration space (tag, queue count), features, activation,
//! reset and state.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use log::info;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_queue::Queue;

use super::config::{ConfigError, ShareConfig, ShareOptions, TAG_LEN};
use super::queue_handler::{Active, FsHandler};
use super::worker::{Worker, WorkerContext, WorkerError};
use super::{NUM_QUEUES, NUM_REQUEST_QUEUES, QUEUE_SIZE};
use crate::virtio::common::{common_accessors, HasCore, VirtioCommon};
use crate::virtio::features::{
    bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::virtio::persist::same;
use crate::virtio::{
    lock, read_config_bytes, ActivateError, DeviceState, GuestMem, Interrupt, PersistError,
    QueuePosition, VirtioDevice,
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
    common: VirtioCommon,
    share: ShareConfig,
    config: [u8; CONFIG_LEN],
    handler: Arc<Mutex<FsHandler>>,
}

impl Fs {
    /// Builds the device for `share` (checked again: tag and directory). The file system is
    /// opened when the driver activates the device.
    pub fn new(share: ShareConfig) -> Result<Fs, FsError> {
        let share = ShareConfig::new(&share.tag, &share.dir, share.options)?;
        let (common, handler) = VirtioCommon::with_handler(
            format!("virtio-fs {}", share.tag),
            VIRTIO_ID_FS,
            &[QUEUE_SIZE; NUM_QUEUES],
            bit(VIRTIO_F_VERSION_1)
                | bit(VIRTIO_RING_F_INDIRECT_DESC)
                | bit(VIRTIO_RING_F_EVENT_IDX),
            FsHandler::new,
        )
        .map_err(FsError::EventFd)?;
        let mut config = [0u8; CONFIG_LEN];
        config[..TAG_LEN].copy_from_slice(&share.tag_bytes());
        config[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        Ok(Fs {
            common,
            share,
            config,
            handler,
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
        let queues = lock(&self.handler).core().queue_positions();
        FsState {
            tag: self.share.tag.clone(),
            dir: self.share.dir.clone(),
            options: self.share.options,
            avail_features: self.common.features().avail(),
            acked_features: self.common.features().acked(),
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

impl VirtioDevice for Fs {
    common_accessors!(common);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.common.check_queues(&queues)?;
        lock(&self.handler).core().check_idle()?;
        // The worker opens the share before this returns; the handler is not locked
        // meanwhile, so the event loop never waits on the file system. The transport's lock keeps
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
        // Wakes the handler, which kicks the worker to serve anything the driver queued
        // before DRIVER_OK.
        lock(&self.handler).core_mut().activate(Active {
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
        true
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
