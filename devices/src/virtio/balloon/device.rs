//! The virtio-balloon device: configuration space, features, activation, reset, saved
//! state, and [`BalloonControl`], the host's handle on the target.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::{info, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::Queue;

use super::queue_handler::{Active, BalloonHandler};
use super::{F_REPORTING, PAGE_SHIFT, QUEUE_SIZE};
use crate::virtio::common::{common_accessors, ActiveQueues, HasCore, VirtioCommon};
use crate::virtio::features::{bit, VIRTIO_F_VERSION_1};
use crate::virtio::{
    lock, read_config_bytes, ActivateError, DeviceState, GuestMem, Interrupt, PersistError,
    QueuePosition, VirtioDevice,
};

/// Offset of `actual` in the config space (after `num_pages`).
const ACTUAL_OFFSET: u64 = 4;
/// Size of the config space the device has (`num_pages`, `actual`).
const CONFIG_LEN: usize = 8;

/// Counters and the target and `actual`, shared by the device, its handler and the host's
/// [`BalloonControl`]s.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    target_pages: AtomicU32,
    actual_pages: AtomicU32,
    inflated_pages: AtomicU64,
    deflated_pages: AtomicU64,
    reported_bytes: AtomicU64,
    rejected: AtomicU64,
    /// The running device's interrupt, to announce a new target.
    interrupt: Mutex<Option<Arc<Interrupt>>>,
}

impl Shared {
    pub(crate) fn inflated(&self, pages: u64) {
        self.inflated_pages.fetch_add(pages, Ordering::Relaxed);
    }

    pub(crate) fn deflated(&self, pages: u64) {
        self.deflated_pages.fetch_add(pages, Ordering::Relaxed);
    }

    pub(crate) fn reported(&self, bytes: u64) {
        self.reported_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn reject(&self, what: u64) {
        self.rejected.fetch_add(what, Ordering::Relaxed);
    }
}

/// What the balloon has done since the device was created, and where it stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// The target: 4 KiB pages the host wants in the balloon.
    pub target_pages: u32,
    /// 4 KiB pages the driver says it holds (its word, not checked).
    pub actual_pages: u32,
    /// Pages the guest put in the balloon (and the host discarded).
    pub inflated_pages: u64,
    /// Pages the guest took back.
    pub deflated_pages: u64,
    /// Bytes of free memory the guest reported (and the host discarded).
    pub reported_bytes: u64,
    /// Frame numbers, ranges or descriptors that were refused (outside guest RAM, wrong
    /// direction, unaligned, oversized).
    pub rejected: u64,
}

/// The host's handle on a balloon: set the target, read where the guest is. Cheap to clone;
/// usable from any thread, before and after the driver starts the device.
#[derive(Debug, Clone)]
pub struct BalloonControl(Arc<Shared>);

impl BalloonControl {
    /// Asks the guest to hold `pages` 4 KiB pages in the balloon (0: give everything back).
    /// A running driver is told with a config-change interrupt; a driver that starts later
    /// reads the target when it probes.
    pub fn set_target_pages(&self, pages: u32) {
        self.0.target_pages.store(pages, Ordering::SeqCst);
        if let Some(interrupt) = lock(&self.0.interrupt).as_ref() {
            interrupt.signal_config_change();
        }
    }

    /// [`set_target_pages`](Self::set_target_pages) in MiB (saturating at the largest
    /// target the config space holds).
    pub fn set_target_mib(&self, mib: u64) {
        let pages = mib.saturating_mul(1 << (20 - PAGE_SHIFT));
        self.set_target_pages(u32::try_from(pages).unwrap_or(u32::MAX));
    }

    /// The current target in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.0.target_pages.load(Ordering::SeqCst)
    }

    /// The pages the driver says it holds.
    pub fn actual_pages(&self) -> u32 {
        self.0.actual_pages.load(Ordering::SeqCst)
    }

    /// [`actual_pages`](Self::actual_pages) in whole MiB.
    pub fn actual_mib(&self) -> u64 {
        u64::from(self.actual_pages()) >> (20 - PAGE_SHIFT)
    }

    /// Whether the driver runs the device (it can follow a target now).
    pub fn driver_running(&self) -> bool {
        lock(&self.0.interrupt).is_some()
    }

    /// Counters and positions.
    pub fn stats(&self) -> BalloonStats {
        let s = &self.0;
        BalloonStats {
            target_pages: s.target_pages.load(Ordering::SeqCst),
            actual_pages: s.actual_pages.load(Ordering::SeqCst),
            inflated_pages: s.inflated_pages.load(Ordering::Relaxed),
            deflated_pages: s.deflated_pages.load(Ordering::Relaxed),
            reported_bytes: s.reported_bytes.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
        }
    }
}

/// The device's saved state. The target and `actual` are restored as saved: the restored
/// guest's driver holds the pages it held, and the host's target stands until it is set
/// anew.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub avail_features: u64,
    pub acked_features: u64,
    /// Positions in the queues in use, while the device is active.
    pub queues: Option<Vec<QueuePosition>>,
}

/// A virtio-balloon device.
pub struct Balloon {
    common: VirtioCommon,
    shared: Arc<Shared>,
    handler: Arc<Mutex<BalloonHandler>>,
}

impl Balloon {
    /// A balloon with target 0 (the guest keeps all its memory) and free page reporting
    /// offered.
    pub fn new() -> io::Result<Balloon> {
        let shared = Arc::new(Shared::default());
        let avail = bit(VIRTIO_F_VERSION_1) | bit(F_REPORTING);
        let for_handler = shared.clone();
        let (common, handler) = VirtioCommon::with_handler(
            "virtio-balloon",
            VIRTIO_ID_BALLOON,
            &[QUEUE_SIZE; 3],
            avail,
            |core| BalloonHandler::new(core, for_handler),
        )?;
        Ok(Balloon {
            common,
            shared,
            handler,
        })
    }

    /// The host's handle on the target and counters.
    pub fn control(&self) -> BalloonControl {
        BalloonControl(self.shared.clone())
    }

    /// The event-loop handler (also reachable as [`VirtioDevice::subscriber`]).
    pub fn handler(&self) -> Arc<Mutex<BalloonHandler>> {
        self.handler.clone()
    }

    /// The device's state.
    pub fn state(&self) -> BalloonState {
        BalloonState {
            target_pages: self.shared.target_pages.load(Ordering::SeqCst),
            actual_pages: self.shared.actual_pages.load(Ordering::SeqCst),
            avail_features: self.common.features().avail(),
            acked_features: self.common.features().acked(),
            queues: lock(&self.handler).core().queue_positions(),
        }
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..4].copy_from_slice(
            &self
                .shared
                .target_pages
                .load(Ordering::SeqCst)
                .to_le_bytes(),
        );
        c[4..].copy_from_slice(
            &self
                .shared
                .actual_pages
                .load(Ordering::SeqCst)
                .to_le_bytes(),
        );
        c
    }
}

impl VirtioDevice for Balloon {
    common_accessors!(common);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    /// Only `actual` is the driver's to write, and only whole.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset == ACTUAL_OFFSET => {
                self.shared
                    .actual_pages
                    .store(u32::from_le_bytes(bytes), Ordering::SeqCst);
            }
            _ => warn!(
                "virtio-balloon: guest wrote {} bytes at config offset {offset:#x}; only the 4 bytes of `actual` at {ACTUAL_OFFSET:#x} are writable, ignored",
                data.len()
            ),
        }
    }

    fn queues_in_use(&self, acked_features: u64) -> usize {
        if acked_features & bit(F_REPORTING) != 0 {
            3
        } else {
            2
        }
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let expected = self.queues_in_use(self.common.features().acked());
        if queues.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        let mut handler = lock(&self.handler);
        handler.core().check_idle()?;
        let io = ActiveQueues::new(handler.core(), mem, interrupt.clone(), queues);
        *lock(&self.shared.interrupt) = Some(interrupt);
        handler.core_mut().activate(Active { io });
        info!(
            "virtio-balloon: active, free page reporting {}",
            if expected == 3 { "on" } else { "off" }
        );
        Ok(())
    }

    fn reset(&mut self) -> bool {
        *lock(&self.shared.interrupt) = None;
        lock(&self.handler).core_mut().reset();
        // A new driver starts with an empty balloon.
        self.shared.actual_pages.store(0, Ordering::SeqCst);
        true
    }

    fn save(&self) -> DeviceState {
        DeviceState::Balloon(self.state())
    }

    fn check_restore(&self, saved: &DeviceState) -> Result<(), PersistError> {
        saved.same_kind(&self.save())
    }

    fn load(&mut self, saved: &DeviceState) {
        if let DeviceState::Balloon(s) = saved {
            self.shared
                .target_pages
                .store(s.target_pages, Ordering::SeqCst);
            self.shared
                .actual_pages
                .store(s.actual_pages, Ordering::SeqCst);
        }
    }
}
