//! The device manager: creates the VM's devices, places them on the port-I/O and MMIO buses,
//! and wires their interrupts (irqfds on the in-kernel IOAPIC) and VMM notifications.
//!
//! Legacy devices: COM1 (0x3f8, IRQ 4), the i8042 (0x60..0x64) and the boot timer (MMIO at
//! the start of the gap). Virtio-mmio devices get consecutive 4 KiB windows from
//! `VIRTIO_MMIO_START` and consecutive GSIs from `FIRST_DEVICE_GSI` (edge-triggered irqfds),
//! one ioeventfd per queue on the window's `QueueNotify`, and a
//! `virtio_mmio.device=4K@base:gsi` word on the kernel command line.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use devices::legacy::boot_timer::BOOT_TIMER_LEN;
use devices::legacy::i8042::{I8042_PORT_BASE, I8042_PORT_LEN};
use devices::legacy::serial::SerialRestoreError;
use devices::legacy::serial::{SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN};
use devices::legacy::{BootTimer, ConsoleLog, IrqTrigger, Serial, SerialPersist, I8042};
use devices::virtio::balloon::BalloonControl;
use devices::virtio::mmio::{kernel_cmdline_arg, MmioError, MMIO_WINDOW_SIZE, NOTIFY_OFFSET};
use devices::virtio::{DeviceSubscriber, MmioTransport, VirtioDevice};
use devices::{Bus, BusError};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::{
    BOOT_TIMER_START, FIRST_DEVICE_GSI, IOAPIC_PINS, VIRTIO_MMIO_END, VIRTIO_MMIO_START,
};
use crate::config::ConsoleConfig;
use crate::memory::GuestMem;

/// Errors of device set-up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an event fd for {what}: {source}")]
    EventFd {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot register the irqfd for GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cannot open the console file {path}: {source}")]
    ConsoleFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("device placement: {0}")]
    Bus(#[from] BusError),
    #[error("too many virtio devices: at most {max} fit the interrupt lines and MMIO windows")]
    TooManyDevices { max: usize },
    #[error("cannot register the queue notification of the device at {base:#x}: {source}")]
    Ioeventfd {
        base: u64,
        source: kvm_ioctls::Error,
    },
    #[error("virtio transport: {0}")]
    Transport(#[from] MmioError),
    #[error("serial console: {0}")]
    SerialState(#[from] SerialRestoreError),
}

/// How many virtio-mmio devices fit: one GSI each from `FIRST_DEVICE_GSI` to the last IOAPIC pin.
pub const MAX_VIRTIO_DEVICES: usize = (IOAPIC_PINS - FIRST_DEVICE_GSI) as usize;

fn event_fd(what: &'static str) -> Result<EventFd, DeviceError> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { what, source })
}

/// Clones an event fd, naming what it is for in the error.
pub(crate) fn clone_fd(evt: &EventFd, what: &'static str) -> Result<EventFd, DeviceError> {
    evt.try_clone()
        .map_err(|source| DeviceError::EventFd { what, source })
}

/// The VM's devices and the buses they sit on.
pub struct DeviceManager {
    pub pio: Bus,
    pub mmio: Bus,
    pub serial: Arc<Mutex<Serial>>,
    pub console_log: Arc<Mutex<ConsoleLog>>,
    /// Signalled by the i8042 when the guest resets the machine.
    pub reset_evt: EventFd,
    /// Signalled by the boot timer when the guest's init has started.
    pub init_evt: EventFd,
    /// Signalled by the UART when the guest has drained its input FIFO.
    pub console_fifo_empty: EventFd,
    /// When the guest wrote the boot-timer marker.
    pub init_marked: Arc<OnceLock<Instant>>,
    /// Event-loop subscribers of the virtio devices.
    pub subscribers: Vec<DeviceSubscriber>,
    /// Kernel command-line words declaring the virtio devices.
    pub cmdline_words: Vec<String>,
    /// The virtio transports, in MMIO window order (for snapshots).
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
    /// The balloon's control, if the VM has one.
    pub balloon: Option<BalloonControl>,
}

impl DeviceManager {
    /// Creates the legacy devices and registers their interrupts with `vm`; the UART starts
    /// from `serial` if given (a restored VM).
    pub fn new(
        vm: &VmFd,
        console: &ConsoleConfig,
        serial: Option<&SerialPersist>,
    ) -> Result<DeviceManager, DeviceError> {
        let mut pio = Bus::new();
        let mut mmio = Bus::new();

        let sink: Box<dyn Write + Send> = match console {
            ConsoleConfig::Stdio => Box::new(std::io::stdout()),
            ConsoleConfig::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| DeviceError::ConsoleFile {
                        path: path.clone(),
                        source,
                    })?,
            ),
            ConsoleConfig::CappedFile(path, cap) => Box::new(
                crate::console_file::CappedLog::open(path, *cap).map_err(|source| {
                    DeviceError::ConsoleFile {
                        path: path.clone(),
                        source,
                    }
                })?,
            ),
            ConsoleConfig::Discard => Box::new(std::io::sink()),
        };
        let serial_irq = event_fd("the serial IRQ")?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|source| DeviceError::Irqfd {
                gsi: SERIAL_IRQ,
                source,
            })?;
        let console_log = ConsoleLog::shared();
        let console_fifo_empty = event_fd("console input")?;
        let irq = IrqTrigger::new(serial_irq);
        let fifo_empty = Some(clone_fd(&console_fifo_empty, "console input")?);
        let serial = Arc::new(Mutex::new(match serial {
            Some(state) => Serial::from_state(state, irq, sink, console_log.clone(), fifo_empty)?,
            None => Serial::new(irq, sink, console_log.clone(), fifo_empty),
        }));
        pio.insert(serial.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)?;

        let reset_evt = event_fd("the i8042 reset line")?;
        let i8042 = I8042::new(clone_fd(&reset_evt, "the i8042 reset line")?);
        pio.insert(Arc::new(Mutex::new(i8042)), I8042_PORT_BASE, I8042_PORT_LEN)?;

        let init_evt = event_fd("the boot timer")?;
        let init_marked = Arc::new(OnceLock::new());
        let timer = BootTimer::new(
            init_marked.clone(),
            Some(clone_fd(&init_evt, "the boot timer")?),
        );
        mmio.insert(
            Arc::new(Mutex::new(timer)),
            BOOT_TIMER_START,
            BOOT_TIMER_LEN,
        )?;

        Ok(DeviceManager {
            pio,
            mmio,
            serial,
            console_log,
            reset_evt,
            init_evt,
            console_fifo_empty,
            init_marked,
            subscribers: Vec::new(),
            cmdline_words: Vec::new(),
            virtio: Vec::new(),
            balloon: None,
        })
    }

    /// Puts `device` behind a virtio-mmio transport at the next free window and GSI.
    pub fn add_virtio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMem,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), DeviceError> {
        let index = self.virtio.len();
        let base = VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW_SIZE;
        if index >= MAX_VIRTIO_DEVICES || base + MMIO_WINDOW_SIZE > VIRTIO_MMIO_END {
            return Err(DeviceError::TooManyDevices {
                max: MAX_VIRTIO_DEVICES,
            });
        }
        let gsi = FIRST_DEVICE_GSI + u32::try_from(index).expect("below MAX_VIRTIO_DEVICES");
        let irq = event_fd("a virtio interrupt")?;
        vm.register_irqfd(&irq, gsi)
            .map_err(|source| DeviceError::Irqfd { gsi, source })?;
        let transport = MmioTransport::new(mem.clone(), device, irq)?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + NOTIFY_OFFSET),
                u32::try_from(queue).expect("a device has a few queues"),
            )
            .map_err(|source| DeviceError::Ioeventfd { base, source })?;
        }
        self.subscribers.push(transport.subscriber());
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_WINDOW_SIZE)?;
        self.virtio.push(transport);
        self.cmdline_words.push(kernel_cmdline_arg(base, gsi));
        Ok(())
    }
}
