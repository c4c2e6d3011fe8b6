//! Virtio devices (virtio 1.x) and their virtio-mmio transport.
//!
//! How the pieces fit, for maintainers:
//!
//! * A device implements [`VirtioDevice`]: what it is (type, queues, features, config space)
//!   and what it does once the driver is ready ([`VirtioDevice::activate`]). What every
//!   device has — identity, queues, kick fds, features, and the event-loop skeleton of its
//!   subscriber — is written once in [`common`]; a device adds only what is its own.
//! * [`mmio::MmioTransport`] wraps one device and is the [`BusDevice`](crate::BusDevice) the
//!   VMM puts on its MMIO bus. It owns the driver-facing registers, the status state machine
//!   and queue configuration, and hands ready [`Queue`]s to the device at `DRIVER_OK`.
//! * Each queue has a kick [`EventFd`] owned by the device ([`VirtioDevice::queue_events`]).
//!   The VMM registers it as an ioeventfd on the window's `QueueNotify` register
//!   (datamatch = queue index); the transport also writes it on a trapped `QueueNotify`.
//! * Device work never runs on a vCPU thread: each device has an event-manager subscriber
//!   ([`VirtioDevice::subscriber`]) that watches the kick fds on the VMM's event loop. It is
//!   added to the loop once, when the VM is built; before activation it just drains kicks.
//! * Interrupts go through an [`Interrupt`]: it sets the transport's `InterruptStatus` bits
//!   and writes the irqfd the VMM registered on the device's GSI. It also carries the
//!   "device needs reset" flag a device raises when the driver broke the protocol.
//!
//! Devices: [`block`] (virtio-blk), [`fs`] (virtio-fs), [`vsock`] (virtio-vsock), [`net`]
//! (virtio-net on a tap), [`balloon`] (virtio-balloon with free page reporting). The test driver in `test_utils` (built for tests and
//! with the `test-utils` feature) drives a device through the transport's registers exactly
//! like the Linux virtio-mmio driver does.

pub mod balloon;
pub mod block;
pub mod common;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod persist;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod vsock;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::MutEventSubscriber;
use log::warn;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use common::VirtioCommon;
pub use mmio::MmioTransport;
pub use persist::{DeviceState, MmioPersist, PersistError, QueuePosition};

/// Guest memory as devices see it (the same type as the VMM's guest RAM).
pub type GuestMem = GuestMemoryMmap<()>;

/// A device's event-loop subscriber, in the shape the VMM's event loop takes.
pub type DeviceSubscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 0x01;
    pub const DRIVER: u32 = 0x02;
    pub const DRIVER_OK: u32 = 0x04;
    pub const FEATURES_OK: u32 = 0x08;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// A constant (virtio-bindings' `u32` values, sizes, limits) in the narrower field it goes
/// in. Use these in `const` items: a value that does not fit then fails the build. Never
/// for guest values: those go through `try_from` and the device's error.
pub const fn const_u8(v: u32) -> u8 {
    let [b, 0, 0, 0] = v.to_le_bytes() else {
        panic!("constant does not fit a u8")
    };
    b
}

/// As [`const_u8`], for a 16-bit field.
pub const fn const_u16(v: u32) -> u16 {
    let [lo, hi, 0, 0] = v.to_le_bytes() else {
        panic!("constant does not fit a u16")
    };
    u16::from_le_bytes([lo, hi])
}

/// As [`const_u8`], for a 32-bit field (from a `u64` or, with `as u64`, a `usize`).
pub const fn const_u32(v: u64) -> u32 {
    let [a, b, c, d, 0, 0, 0, 0] = v.to_le_bytes() else {
        panic!("constant does not fit a u32")
    };
    u32::from_le_bytes([a, b, c, d])
}

/// Feature bits common to all devices (virtio 1.x §6).
pub mod features {
    /// Indirect descriptor tables.
    pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
    /// `used_event` / `avail_event` notification suppression.
    pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
    /// A virtio 1.x (non-legacy) device: required by this transport.
    pub const VIRTIO_F_VERSION_1: u32 = 32;

    /// The mask of feature bit `bit`.
    pub const fn bit(bit: u32) -> u64 {
        1u64 << bit
    }
}

/// Interrupt status bit: the device used buffers on a queue.
pub const INT_USED_RING: u32 = 0x1;
/// Interrupt status bit: the device's configuration (or status) changed.
pub const INT_CONFIG_CHANGE: u32 = 0x2;

/// A device's interrupt line as the transport exposes it: the `InterruptStatus` register,
/// the device-needs-reset flag and the irqfd (edge-triggered GSI) the VMM registered.
///
/// Shared between the transport (which reads and acknowledges it) and the device's threads
/// (which raise it); it never needs the transport's lock.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq: EventFd,
}

impl Interrupt {
    /// An interrupt that signals `irq` (registered by the VMM as an irqfd).
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq,
        }
    }

    /// The event fd to register with KVM as the device's irqfd.
    pub fn irq_event(&self) -> &EventFd {
        &self.irq
    }

    /// Tells the driver that a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    /// Tells the driver that the configuration space (or the device status) changed.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG_CHANGE);
    }

    /// Puts the device into `DEVICE_NEEDS_RESET` (the driver broke the protocol in a way the
    /// device cannot recover from) and tells the driver with a config-change interrupt.
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            warn!("virtio: device needs reset; the guest driver must reset it");
        }
        self.signal_config_change();
    }

    /// Whether [`Interrupt::set_needs_reset`] was called since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// `InterruptACK`: clears the acknowledged bits.
    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Device reset: no pending interrupt, no needs-reset.
    pub(crate) fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Puts back a saved `InterruptStatus` and needs-reset flag (snapshot restore); a
    /// pending interrupt is raised again, since the guest may not have seen it.
    pub(crate) fn restore(&self, status: u32, needs_reset: bool) {
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
        self.status.store(0, Ordering::SeqCst);
        if status != 0 {
            self.raise(status);
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            warn!("virtio: cannot signal the interrupt event fd, the guest may stall: {e}");
        }
    }
}

/// The feature bits a device offers and the subset the driver accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeatureSet {
    avail: u64,
    acked: u64,
}

impl FeatureSet {
    /// A device offering `avail`, nothing accepted yet.
    pub const fn new(avail: u64) -> Self {
        Self { avail, acked: 0 }
    }

    /// The offered features.
    pub fn avail(&self) -> u64 {
        self.avail
    }

    /// The accepted features.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Records the driver's choice; bits that were not offered are dropped.
    pub fn ack(&mut self, features: u64) {
        self.acked = features & self.avail;
    }

    /// Forgets the driver's choice (device reset).
    pub fn clear_acked(&mut self) {
        self.acked = 0;
    }
}

/// Why a device could not start with the queues the driver configured. The transport puts
/// the device into `DEVICE_NEEDS_RESET` and the guest sees the failure; nothing panics.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {index}: {reason}; the guest driver configured it wrongly")]
    InvalidQueue { index: usize, reason: String },
    #[error("the device got {got} queues but has {expected}: a transport bug")]
    QueueCount { expected: usize, got: usize },
    #[error("the device is already active: reset it first")]
    AlreadyActive,
    #[error("cannot start the device's worker: {0}; check the process's thread limit")]
    Worker(io::Error),
    #[error("device back end: {0}")]
    Backend(String),
}

/// A virtio device behind a transport.
///
/// The transport calls these from vCPU threads (under its lock); the device's data path runs
/// on its [`subscriber`](VirtioDevice::subscriber) and worker threads.
pub trait VirtioDevice: Send {
    /// The parts every device has (see [`common`]); the identity, queue and feature methods
    /// below are answered from it unless a device overrides them.
    fn common(&self) -> &VirtioCommon;

    /// Mutable access to [`VirtioDevice::common`].
    fn common_mut(&mut self) -> &mut VirtioCommon;

    /// The virtio device ID (e.g. 2 for block).
    fn device_type(&self) -> u32 {
        self.common().device_type()
    }

    /// The maximum size of each queue (powers of two); the device has this many queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().queue_max_sizes()
    }

    /// One kick event fd per queue: the VMM registers them as ioeventfds, the transport
    /// writes them on a trapped `QueueNotify`, the subscriber watches them.
    fn queue_events(&self) -> &[EventFd] {
        self.common().queue_events()
    }

    /// The features the device offers.
    fn avail_features(&self) -> u64 {
        self.common().features().avail()
    }

    /// The features the driver accepted (a subset of [`avail_features`]).
    ///
    /// [`avail_features`]: VirtioDevice::avail_features
    fn acked_features(&self) -> u64 {
        self.common().features().acked()
    }

    /// Records the driver's accepted features at `FEATURES_OK` (already checked to be a
    /// subset of the offered ones).
    fn set_acked_features(&mut self, features: u64) {
        self.common_mut().features_mut().ack(features);
    }

    /// Reads the device configuration space at `offset` (out-of-range bytes read as 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space (devices ignore what they do not support; by
    /// default the whole config space is read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.common().ignore_config_write(offset, data);
    }

    /// How many of the device's queues a driver that accepted `acked_features` uses: the
    /// first ones, in order. By default all of them; a device whose queues depend on
    /// features (virtio-balloon's reporting queue) says fewer, and the transport then
    /// requires and hands over only those.
    fn queues_in_use(&self, acked_features: u64) -> usize {
        let _ = acked_features;
        self.queue_max_sizes().len()
    }

    /// Starts the device at `DRIVER_OK` with the driver's queues (validated by the
    /// transport, one per queue in use, see [`queues_in_use`](VirtioDevice::queues_in_use)).
    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;

    /// Stops the device and forgets its queues (the driver wrote 0 to `Status`; the
    /// transport then clears the accepted features). When this returns, the device no
    /// longer touches guest memory. Returns `false` if the device
    /// cannot be reset; the transport then keeps it in `DEVICE_NEEDS_RESET` for good.
    fn reset(&mut self) -> bool;

    /// The subscriber to add to the VMM's event loop (once, when the VM is built).
    fn subscriber(&self) -> DeviceSubscriber {
        self.common().subscriber()
    }

    /// The device's saved state: identity, features and, while active, its queues (see
    /// [`persist`]). Consistent only at a quiescent point (no request in flight).
    fn save(&self) -> DeviceState;

    /// Checks that `saved` comes from a device of this kind with the guest-visible identity
    /// of this one (what the guest driver has already read: capacity, tag, CID). The
    /// transport then restores the features and, if it was running, activates the device
    /// with the saved queues.
    fn check_restore(&self, saved: &DeviceState) -> Result<(), PersistError>;

    /// Takes the device-specific state of `saved` (already checked with
    /// [`check_restore`](VirtioDevice::check_restore)) that is neither identity nor queues,
    /// e.g. a balloon's target. Called by the transport before it restarts the device.
    fn load(&mut self, saved: &DeviceState) {
        let _ = saved;
    }

    /// Called once a restored device runs again (after its activation with the saved
    /// queues), e.g. to tell the guest that host-side sessions are gone.
    fn restored(&mut self) {}
}

/// Locks `m`, recovering from poisoning: a panic on one thread must not take the device's
/// other threads (or the vCPUs) down with it.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Copies `src` (a little-endian config space image) into `data` from `offset`; bytes past
/// the end read as 0. For [`VirtioDevice::read_config`] implementations.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(avail) = src.get(start..) {
        let n = avail.len().min(data.len());
        data[..n].copy_from_slice(&avail[..n]);
    }
}

/// Sets `O_NONBLOCK` on `fd` (device fds are served on the event loop, which must never
/// block).
pub(crate) fn set_nonblocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on an fd we own, with no pointers involved; the result is checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
