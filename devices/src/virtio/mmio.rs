//! The virtio-mmio transport, version 2 (virtio 1.x, §4.2 of the spec).
//!
//! [`MmioTransport`] is the [`BusDevice`] for one device's 4 KiB window. It holds what the
//! driver writes (feature selectors, queue configuration, status) and validates it; the
//! device only sees a feature set at `FEATURES_OK` and ready [`Queue`]s at `DRIVER_OK`.
//!
//! Rules enforced here, all against a possibly hostile guest, none of which panics:
//! * Registers are 32 bits wide and 4-byte aligned; other accesses are ignored (reads give
//!   zeros) with a warning. The config space (0x100 and up) takes any width.
//! * Status moves only ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK, one step at a time;
//!   anything else is ignored with a warning, except 0 (reset: device, accepted features and
//!   every queue register back to their initial state) and FAILED (the driver gave up).
//! * FEATURES_OK is refused (the bit stays clear, as the spec says) unless the driver took
//!   `VIRTIO_F_VERSION_1` and nothing the device did not offer.
//! * Queue registers are writable only between FEATURES_OK and DRIVER_OK, on a queue that is
//!   not ready. The values are checked at DRIVER_OK (size a power of two ≤ max, rings aligned
//!   and inside guest memory, every queue the device uses with the accepted features ready,
//!   see `VirtioDevice::queues_in_use`); a bad configuration puts the device into
//!   `DEVICE_NEEDS_RESET` with a config-change interrupt.
//! * `QueueNotify` writes the queue's kick event fd (the same fd the VMM registers as an
//!   ioeventfd, so a trapped write and a KVM-handled one look alike to the device); notifies
//!   before DRIVER_OK or for a queue that does not exist are ignored.
//!
//! For the VMM: place the transport at a [`MMIO_WINDOW_SIZE`] window, register
//! [`MmioTransport::queue_events`]`[i]` as an ioeventfd at `base + `[`NOTIFY_OFFSET`] with
//! datamatch `i` (4 bytes), register the irq event fd given to [`MmioTransport::new`] as an
//! irqfd on the GSI, add [`MmioTransport::subscriber`] to the event loop, and tell the guest
//! with [`kernel_cmdline_arg`].

use std::sync::Arc;

use log::{debug, error, info, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::features::{bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use super::persist::{MmioPersist, PersistError, QueuePosition};
use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{ActivateError, DeviceSubscriber, GuestMem, Interrupt, VirtioDevice};
use crate::bus::BusDevice;

/// The register state as snapshots hold it; defined with the rest of the saved state.
pub use super::persist::{MmioState, QueueRegs};

/// Size of a device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of `QueueNotify` in the window (where the VMM puts the ioeventfds).
pub const NOTIFY_OFFSET: u64 = regs::QUEUE_NOTIFY;

/// "virt" in little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// virtio-mmio version 2 (non-legacy).
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("PDVS").
pub const VENDOR_ID: u32 = 0x5356_4450;

/// Register offsets (virtio 1.x §4.2.2).
pub mod regs {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// The kernel command-line word that declares a device at `base` on `gsi` to Linux
/// (needs `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
pub fn kernel_cmdline_arg(base: u64, gsi: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{gsi}")
}

/// Errors of transport set-up.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("device has {sizes} queue sizes but {events} queue event fds: fix the device")]
    QueueEventCount { sizes: usize, events: usize },
    #[error(
        "queue {index}: maximum size {max} is not a power of two in 1..=32768: fix the device"
    )]
    QueueMaxSize { index: usize, max: u16 },
}

/// Transport behaviour of the saved queue registers.
impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }

    /// Builds the `Queue` the device will use, or says what the driver got wrong.
    fn to_queue(self, mem: &GuestMem, event_idx: bool) -> Result<Queue, String> {
        if !self.ready {
            return Err("not ready at DRIVER_OK".into());
        }
        let mut q = Queue::new(self.max_size).map_err(|e| format!("{e}"))?;
        q.try_set_size(self.size).map_err(|_| {
            format!(
                "size {} is not a power of two in 1..={}",
                self.size, self.max_size
            )
        })?;
        q.try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(|e| format!("descriptor table {:#x}: {e}", self.desc_table))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(|e| format!("available ring {:#x}: {e}", self.avail_ring))?;
        q.try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(|e| format!("used ring {:#x}: {e}", self.used_ring))?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err(format!(
                "rings (desc {:#x}, avail {:#x}, used {:#x}, size {}) are not inside guest memory",
                self.desc_table, self.avail_ring, self.used_ring, self.size
            ));
        }
        Ok(q)
    }
}

/// A virtio device behind a virtio-mmio v2 register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    interrupt: Arc<Interrupt>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    config_generation: u32,
    /// The device refused a reset: it stays in DEVICE_NEEDS_RESET.
    broken: bool,
}

impl MmioTransport {
    /// Wraps `device`. `irq` is the event fd the VMM registers as the device's irqfd.
    pub fn new(
        mem: GuestMem,
        device: Box<dyn VirtioDevice>,
        irq: EventFd,
    ) -> Result<Self, MmioError> {
        let sizes = device.queue_max_sizes();
        let events = device.queue_events().len();
        if sizes.len() != events {
            return Err(MmioError::QueueEventCount {
                sizes: sizes.len(),
                events,
            });
        }
        for (index, &max) in sizes.iter().enumerate() {
            if Queue::new(max).is_err() {
                return Err(MmioError::QueueMaxSize { index, max });
            }
        }
        let queues = sizes.iter().map(|&m| QueueRegs::new(m)).collect();
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
            broken: false,
        })
    }

    /// The device's kick event fds, one per queue (register `[i]` as an ioeventfd at
    /// `base + NOTIFY_OFFSET`, datamatch `i`).
    pub fn queue_events(&self) -> &[EventFd] {
        self.device.queue_events()
    }

    /// The interrupt line (its [`Interrupt::irq_event`] is the irqfd).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device's event-loop subscriber.
    pub fn subscriber(&self) -> DeviceSubscriber {
        self.device.subscriber()
    }

    /// The wrapped device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The `Status` register as the driver reads it.
    pub fn device_status(&self) -> u32 {
        if self.broken || self.interrupt.needs_reset() {
            self.status | DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The register state.
    pub fn state(&self) -> MmioState {
        MmioState {
            status: self.device_status(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.clone(),
            interrupt_status: self.interrupt.status(),
            needs_reset: self.broken || self.interrupt.needs_reset(),
            config_generation: self.config_generation,
        }
    }

    /// The transport and its device as a snapshot holds them (see
    /// [`persist`](super::persist)).
    pub fn save(&self) -> MmioPersist {
        MmioPersist {
            transport: self.state(),
            device: self.device.save(),
        }
    }

    /// Puts back `saved` on this transport, whose device was just built for this VM and
    /// never touched by a driver. A device that was running is activated again with its
    /// queues where they were, and a pending interrupt is raised again. On error the
    /// transport is left reset (as new).
    pub fn restore(&mut self, saved: &MmioPersist) -> Result<(), PersistError> {
        let result = self.try_restore(saved);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn try_restore(&mut self, saved: &MmioPersist) -> Result<(), PersistError> {
        let t = &saved.transport;
        if t.queues.len() != self.queues.len() {
            return Err(PersistError::QueueCount {
                saved: t.queues.len(),
                current: self.queues.len(),
            });
        }
        self.device.check_restore(&saved.device)?;
        for (index, (s, q)) in t.queues.iter().zip(&self.queues).enumerate() {
            if s.max_size != q.max_size {
                return Err(PersistError::Queue {
                    index,
                    reason: format!(
                        "saved maximum size {}, the device's is {}",
                        s.max_size, q.max_size
                    ),
                });
            }
        }
        let acked = saved.device.acked_features();
        let offered = self.device.avail_features();
        if acked & !offered != 0 {
            return Err(PersistError::Features {
                device: saved.device.kind(),
                acked,
                offered,
            });
        }
        self.device.set_acked_features(acked);
        self.device.load(&saved.device);
        self.status = t.status & !DEVICE_NEEDS_RESET;
        self.device_features_sel = t.device_features_sel;
        self.driver_features_sel = t.driver_features_sel;
        self.driver_features = t.driver_features;
        self.queue_sel = t.queue_sel;
        self.queues.clone_from(&t.queues);
        self.config_generation = t.config_generation;
        if self.status & DRIVER_OK != 0 && !t.needs_reset {
            let positions = saved.device.queues().ok_or(PersistError::MissingQueues)?;
            let in_use = self.queues_in_use();
            if positions.len() != in_use {
                return Err(PersistError::QueueCount {
                    saved: positions.len(),
                    current: in_use,
                });
            }
            self.activate(Some(positions))?;
            self.device.restored();
        }
        self.interrupt.restore(t.interrupt_status, t.needs_reset);
        Ok(())
    }

    /// How many queues (the first ones) the driver uses with the features it accepted.
    fn queues_in_use(&self) -> usize {
        self.device
            .queues_in_use(self.device.acked_features())
            .min(self.queues.len())
    }

    fn selected_queue(&self) -> Option<&QueueRegs> {
        self.queues.get(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC_VALUE => MAGIC_VALUE,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => (self.device.avail_features() & 0xffff_ffff) as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size.into()),
            regs::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready.into()),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.device_status(),
            // No shared memory regions: a length of all ones means "none" to Linux.
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH => u32::MAX,
            regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => u32::MAX,
            regs::CONFIG_GENERATION => self.config_generation,
            _ => {
                warn!("virtio-mmio: guest read of unknown or write-only register {offset:#x}, returning 0");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            regs::DRIVER_FEATURES => self.write_driver_features(value),
            regs::QUEUE_SEL => self.queue_sel = value,
            regs::QUEUE_NUM
            | regs::QUEUE_READY
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_DRIVER_LOW
            | regs::QUEUE_DRIVER_HIGH
            | regs::QUEUE_DEVICE_LOW
            | regs::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, value),
            regs::QUEUE_NOTIFY => self.notify(value),
            regs::INTERRUPT_ACK => self.interrupt.ack(value),
            regs::STATUS => self.write_status(value),
            regs::SHM_SEL => {}
            _ => warn!(
                "virtio-mmio: guest write of {value:#x} to unknown or read-only register {offset:#x} ignored"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (DRIVER | FEATURES_OK) != DRIVER {
            warn!(
                "virtio-mmio: driver features written in status {:#x} (allowed only after DRIVER, before FEATURES_OK); ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            sel => warn!("virtio-mmio: driver features page {sel} does not exist; write ignored"),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        if self.status & (FEATURES_OK | DRIVER_OK) != FEATURES_OK {
            warn!(
                "virtio-mmio: queue register {offset:#x} written in status {:#x} (allowed only after FEATURES_OK, before DRIVER_OK); ignored",
                self.status
            );
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.queues.get_mut(sel as usize) else {
            warn!("virtio-mmio: queue register {offset:#x} written for queue {sel}, which does not exist; ignored");
            return;
        };
        if offset == regs::QUEUE_READY {
            q.ready = value == 1;
            return;
        }
        if q.ready {
            warn!("virtio-mmio: queue {sel} is ready, its register {offset:#x} cannot change; ignored");
            return;
        }
        let set_low = |addr: &mut u64| *addr = (*addr & !0xffff_ffff) | u64::from(value);
        let set_high = |addr: &mut u64| *addr = (*addr & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            // Checked at DRIVER_OK; a u32 that does not fit u16 can never be valid.
            regs::QUEUE_NUM => q.size = u16::try_from(value).unwrap_or(0),
            regs::QUEUE_DESC_LOW => set_low(&mut q.desc_table),
            regs::QUEUE_DESC_HIGH => set_high(&mut q.desc_table),
            regs::QUEUE_DRIVER_LOW => set_low(&mut q.avail_ring),
            regs::QUEUE_DRIVER_HIGH => set_high(&mut q.avail_ring),
            regs::QUEUE_DEVICE_LOW => set_low(&mut q.used_ring),
            regs::QUEUE_DEVICE_HIGH => set_high(&mut q.used_ring),
            _ => {}
        }
    }

    fn notify(&self, value: u32) {
        if self.status & DRIVER_OK == 0 {
            warn!("virtio-mmio: notify for queue {value} before DRIVER_OK; ignored");
            return;
        }
        match self.device.queue_events().get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!("virtio-mmio: cannot kick queue {value}: {e}");
                }
            }
            None => warn!("virtio-mmio: notify for queue {value}, which does not exist; ignored"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if self.broken {
            warn!("virtio-mmio: device could not be reset and is out of service; status {value:#x} ignored");
            return;
        }
        // DEVICE_NEEDS_RESET is the device's bit: drivers read-modify-write it back.
        let value = value & !DEVICE_NEEDS_RESET;
        let old = self.status;
        if value == old {
            return;
        }
        if value & old != old {
            warn!(
                "virtio-mmio: status {old:#x} -> {value:#x} clears bits without a reset; ignored"
            );
            return;
        }
        let added = value & !old;
        if added & FAILED != 0 {
            warn!("virtio-mmio: the guest driver gave up on the device (FAILED)");
            self.status |= FAILED;
            return;
        }
        if old & FAILED != 0 {
            warn!("virtio-mmio: status {value:#x} after FAILED ignored; reset the device first");
            return;
        }
        match (old, added) {
            (0, ACKNOWLEDGE) | (ACKNOWLEDGE, DRIVER) => self.status = value,
            (s, FEATURES_OK) if s == ACKNOWLEDGE | DRIVER => self.features_ok(),
            (s, DRIVER_OK) if s == ACKNOWLEDGE | DRIVER | FEATURES_OK => self.driver_ok(),
            _ => warn!(
                "virtio-mmio: status {old:#x} -> {value:#x} is out of order (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK); ignored"
            ),
        }
    }

    fn features_ok(&mut self) {
        let offered = self.device.avail_features();
        let wanted = self.driver_features;
        if wanted & !offered != 0 {
            warn!(
                "virtio-mmio: driver accepted features {:#x} the device did not offer; FEATURES_OK refused",
                wanted & !offered
            );
            return;
        }
        if wanted & bit(VIRTIO_F_VERSION_1) == 0 {
            warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported); FEATURES_OK refused");
            return;
        }
        self.device.set_acked_features(wanted);
        self.status |= FEATURES_OK;
        debug!("virtio-mmio: features {wanted:#x} accepted");
    }

    fn driver_ok(&mut self) {
        if self.interrupt.needs_reset() {
            warn!("virtio-mmio: DRIVER_OK while the device needs a reset; ignored");
            return;
        }
        match self.activate(None) {
            Ok(()) => {
                self.status |= DRIVER_OK;
                info!(
                    "virtio-mmio: device type {} activated with features {:#x}",
                    self.device.device_type(),
                    self.driver_features
                );
            }
            Err(e) => {
                error!(
                    "virtio-mmio: cannot activate device type {}: {e}",
                    self.device.device_type()
                );
                self.interrupt.set_needs_reset();
            }
        }
    }

    /// Starts the device with the driver's queues, at the ring positions of a snapshot if
    /// `positions` is given (else at the start).
    fn activate(&mut self, positions: Option<&[QueuePosition]>) -> Result<(), ActivateError> {
        let event_idx = self.driver_features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let queues = self
            .queues
            .iter()
            .take(self.queues_in_use())
            .enumerate()
            .map(|(index, regs)| {
                let mut q = regs
                    .to_queue(&self.mem, event_idx)
                    .map_err(|reason| ActivateError::InvalidQueue { index, reason })?;
                if let Some(p) = positions.and_then(|p| p.get(index)) {
                    q.set_next_avail(p.next_avail);
                    q.set_next_used(p.next_used);
                }
                Ok(q)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.device
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
    }

    fn reset(&mut self) {
        // A device that never started has nothing to stop, whatever it answers.
        let was_active = self.status & DRIVER_OK != 0;
        if !self.device.reset() && was_active {
            error!(
                "virtio-mmio: device type {} cannot be reset; it stays out of service",
                self.device.device_type()
            );
            self.broken = true;
        }
        self.device.set_acked_features(0);
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.interrupt.clear();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            self.device.read_config(offset - regs::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            warn!(
                "virtio-mmio: {}-byte read at {offset:#x}: registers are 32-bit aligned; returning zeros",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            self.device.write_config(offset - regs::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn!(
                "virtio-mmio: {}-byte write at {offset:#x}: registers are 32-bit; ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            warn!("virtio-mmio: unaligned write at {offset:#x} ignored");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::virtio::common::common_accessors;
    use crate::virtio::test_utils::MmioDriver;
    use crate::virtio::{DeviceState, VirtioCommon};

    /// A device with two queues that records what the transport does to it.
    struct Dummy {
        common: VirtioCommon,
        /// The kick fds the transport sees (the common ones, unless a test takes one away).
        events: Vec<EventFd>,
        active: bool,
        resettable: bool,
        config: [u8; 8],
    }

    impl Dummy {
        fn new(resettable: bool) -> Self {
            let common =
                VirtioCommon::new("dummy", 42, &[16, 8], bit(VIRTIO_F_VERSION_1) | 0b101).unwrap();
            Self {
                events: common
                    .queue_events()
                    .iter()
                    .map(|e| e.try_clone().unwrap())
                    .collect(),
                common,
                active: false,
                resettable,
                config: *b"abcdefgh",
            }
        }
    }

    impl VirtioDevice for Dummy {
        common_accessors!(common);
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let Ok(start) = usize::try_from(offset) else {
                return;
            };
            if let Some(dst) = self.config.get_mut(start..start + data.len()) {
                dst.copy_from_slice(data);
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMem,
            _interrupt: Arc<Interrupt>,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            assert_eq!(queues.len(), 2);
            self.active = true;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.active = false;
            self.resettable
        }
        fn save(&self) -> DeviceState {
            DeviceState::Generic {
                device_type: 42,
                avail_features: self.avail_features(),
                acked_features: self.acked_features(),
                queues: None,
            }
        }
        fn check_restore(&self, saved: &DeviceState) -> Result<(), PersistError> {
            saved.same_kind(&self.save())
        }
    }

    fn driver(resettable: bool) -> MmioDriver {
        MmioDriver::new(Box::new(Dummy::new(resettable)), 1 << 20)
    }

    #[test]
    fn identity_and_config_space_of_any_width() {
        let mut d = driver(true);
        assert_eq!(d.read32(regs::DEVICE_ID), 42);
        assert_eq!(d.read32(regs::VENDOR_ID), VENDOR_ID);
        assert_eq!(d.read32(regs::CONFIG_GENERATION), 0);
        assert_eq!(d.read32(regs::SHM_LEN_LOW), u32::MAX);
        assert_eq!(d.read_config(1, 1), b"b");
        assert_eq!(d.read_config(2, 2), b"cd");
        assert_eq!(d.read_config(0, 8), b"abcdefgh");
        assert_eq!(d.read_config(6, 4), b"gh\0\0");
        d.transport.write(regs::CONFIG + 4, b"XY");
        assert_eq!(d.read_config(0, 8), b"abcdXYgh");
        assert_eq!(
            kernel_cmdline_arg(0xd000_0000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn queue_registers_follow_queue_sel() {
        let mut d = driver(true);
        d.negotiate(bit(VIRTIO_F_VERSION_1)).unwrap();
        d.write32(regs::QUEUE_SEL, 1);
        assert_eq!(d.read32(regs::QUEUE_NUM_MAX), 8);
        d.setup_queue(1, 8);
        assert_eq!(d.read32(regs::QUEUE_READY), 1);
        d.write32(regs::QUEUE_SEL, 0);
        assert_eq!(d.read32(regs::QUEUE_NUM_MAX), 16);
        assert_eq!(d.read32(regs::QUEUE_READY), 0);
        // One queue not ready at DRIVER_OK: needs reset.
        d.add_status(DRIVER_OK);
        assert_ne!(d.status() & DEVICE_NEEDS_RESET, 0);
        // Ready can be taken back before DRIVER_OK, and then the registers change again.
        d.negotiate(bit(VIRTIO_F_VERSION_1)).unwrap();
        d.setup_queue(0, 16);
        d.write32(regs::QUEUE_READY, 0);
        d.write32(regs::QUEUE_NUM, 4);
        assert_eq!(d.transport.state().queues[0].size, 4);
        d.write32(regs::QUEUE_READY, 1);
        d.setup_queue(1, 8);
        d.add_status(DRIVER_OK);
        assert_eq!(d.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(
            d.transport.device().acked_features(),
            bit(VIRTIO_F_VERSION_1)
        );
        // QueueNotify writes the queue's kick fd.
        d.kick(1);
        assert_eq!(d.transport.queue_events()[1].read().unwrap(), 1);
    }

    #[test]
    fn status_rules() {
        let mut d = driver(true);
        d.negotiate(bit(VIRTIO_F_VERSION_1) | 0b1).unwrap();
        // Clearing bits without a reset is ignored.
        d.write32(regs::STATUS, ACKNOWLEDGE);
        assert_eq!(d.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        // Driver features cannot change after FEATURES_OK.
        d.write_driver_features(bit(VIRTIO_F_VERSION_1) | 0b100);
        assert_eq!(
            d.transport.state().driver_features,
            bit(VIRTIO_F_VERSION_1) | 1
        );
        // FAILED sticks until reset, and nothing goes on after it.
        d.add_status(FAILED);
        assert_eq!(d.status() & FAILED, FAILED);
        d.add_status(DRIVER_OK);
        assert_eq!(d.status() & DRIVER_OK, 0);
        d.write32(regs::STATUS, 0);
        assert_eq!(d.status(), 0);
    }

    #[test]
    fn a_device_that_cannot_reset_stays_out_of_service() {
        let mut d = driver(false);
        d.activate(bit(VIRTIO_F_VERSION_1), 8);
        d.write32(regs::STATUS, 0);
        assert_eq!(d.status(), DEVICE_NEEDS_RESET);
        d.add_status(ACKNOWLEDGE);
        assert_eq!(d.status(), DEVICE_NEEDS_RESET);
    }

    #[test]
    fn rejects_devices_with_bad_queue_sets() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let irq = || EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = Dummy::new(true);
        dev.events.pop();
        assert!(matches!(
            MmioTransport::new(mem, Box::new(dev), irq()),
            Err(MmioError::QueueEventCount {
                sizes: 2,
                events: 1
            })
        ));
    }
}
