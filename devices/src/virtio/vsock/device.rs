//! The virtio-vsock device: configuration space, features, activation, reset and state.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use log::info;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::Queue;
use vmm_sys_util::timerfd::TimerFd;

use super::muxer::Muxer;
use super::queue_handler::VsockHandler;
use super::uds::{self, SocketFile, UdsError};
use super::{Timeouts, NUM_QUEUES, QUEUE_SIZE};
use crate::virtio::common::{common_accessors, ActiveQueues, HasCore, VirtioCommon};
use crate::virtio::features::{
    bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::virtio::persist::same;
use crate::virtio::set_nonblocking;
use crate::virtio::{
    lock, read_config_bytes, ActivateError, DeviceState, GuestMem, Interrupt, PersistError,
    QueuePosition, VirtioDevice,
};

/// Errors building a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is not a valid guest CID (0, 1, 2 and 0xffffffff and above are reserved): use 3 or above")]
    InvalidCid(u64),
    #[error(transparent)]
    Socket(#[from] UdsError),
    #[error("cannot create the device's event fds: {0}; check the process's fd limit")]
    EventFd(std::io::Error),
    #[error("cannot create the connection timer: {0}; check the process's fd limit")]
    Timer(std::io::Error),
}

/// The device's state (for snapshots and tests). Live streams are not part of it: a
/// restored device starts with none and sends the guest a transport reset event, which
/// resets the guest's connected sockets (listeners stay); host clients reconnect. A
/// restored device must have the saved guest CID; `uds_path` is the source VM's and only
/// informative.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    pub avail_features: u64,
    pub acked_features: u64,
    /// Its positions in the queues (rx, tx, event) while the device is active.
    pub queues: Option<Vec<QueuePosition>>,
}

/// A virtio-vsock device with the Unix-socket back end (see the [module docs](super)).
pub struct Vsock {
    common: VirtioCommon,
    guest_cid: u64,
    socket: SocketFile,
    handler: Arc<Mutex<VsockHandler>>,
}

impl Vsock {
    /// A device for guest `guest_cid` listening at `uds_path` (a stale socket file there is
    /// replaced), with the default [`Timeouts`].
    pub fn new(guest_cid: u64, uds_path: impl AsRef<Path>) -> Result<Vsock, VsockError> {
        Self::with_timeouts(guest_cid, uds_path, Timeouts::default())
    }

    /// [`Vsock::new`] with explicit timeouts.
    pub fn with_timeouts(
        guest_cid: u64,
        uds_path: impl AsRef<Path>,
        timeouts: Timeouts,
    ) -> Result<Vsock, VsockError> {
        if guest_cid <= 2 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let uds_path = uds_path.as_ref();
        let (listener, socket) = uds::bind_listener(uds_path)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Timer(e.into()))?;
        set_nonblocking(&timer).map_err(VsockError::Timer)?;
        let muxer = Muxer::new(guest_cid, uds_path, listener, timeouts);
        let (common, handler) = VirtioCommon::with_handler(
            "virtio-vsock",
            VIRTIO_ID_VSOCK,
            &[QUEUE_SIZE; NUM_QUEUES],
            bit(VIRTIO_F_VERSION_1)
                | bit(VIRTIO_RING_F_INDIRECT_DESC)
                | bit(VIRTIO_RING_F_EVENT_IDX),
            |core| VsockHandler::new(core, timer, muxer),
        )
        .map_err(VsockError::EventFd)?;
        info!(
            "virtio-vsock: guest CID {guest_cid}, host socket {}",
            uds_path.display()
        );
        Ok(Vsock {
            common,
            guest_cid,
            socket,
            handler,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The VM's listening socket (host clients connect here; guest connections to port `P`
    /// go to `<uds_path>_P`).
    pub fn uds_path(&self) -> &Path {
        self.socket.path()
    }

    /// The event-loop handler (also reachable as [`VirtioDevice::subscriber`]).
    pub fn handler(&self) -> Arc<Mutex<VsockHandler>> {
        self.handler.clone()
    }

    /// The device's state (live streams are not included).
    pub fn state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            uds_path: self.socket.path().into(),
            avail_features: self.common.features().avail(),
            acked_features: self.common.features().acked(),
            queues: lock(&self.handler).core().queue_positions(),
        }
    }
}

impl VirtioDevice for Vsock {
    common_accessors!(common);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.common.check_queues(&queues)?;
        let mut handler = lock(&self.handler);
        handler.core().check_idle()?;
        let active = ActiveQueues::new(handler.core(), mem, interrupt, queues);
        handler.core_mut().activate(active);
        info!("virtio-vsock: guest CID {} active", self.guest_cid);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        lock(&self.handler).reset();
        true
    }

    fn save(&self) -> DeviceState {
        DeviceState::Vsock(self.state())
    }

    fn check_restore(&self, saved: &DeviceState) -> Result<(), PersistError> {
        let DeviceState::Vsock(s) = saved else {
            return saved.same_kind(&self.save());
        };
        same("virtio-vsock", "guest CID", &s.guest_cid, &self.guest_cid)
    }

    fn restored(&mut self) {
        lock(&self.handler).transport_reset();
    }
}
