//! The device manager: creates the VM's devices, places them on the port-I/O and MMIO buses,
//! and wires their interrupts (irqfds on the in-kernel IOAPIC) and VMM notifications.
//!
//! Legacy devices only for now: COM1 (0x3f8, IRQ 4), the i8042 (0x60..0x64) and the boot
//! timer (MMIO at the start of the gap). Virtio-mmio devices will be allocated windows from
//! `VIRTIO_MMIO_START` and GSIs from `FIRST_DEVICE_GSI` here.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use devices::legacy::boot_timer::BOOT_TIMER_LEN;
use devices::legacy::i8042::{I8042_PORT_BASE, I8042_PORT_LEN};
use devices::legacy::serial::{SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN};
use devices::legacy::{BootTimer, ConsoleLog, IrqTrigger, Serial, I8042};
use devices::{Bus, BusError};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::BOOT_TIMER_START;
use crate::config::ConsoleConfig;

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
}

fn event_fd(what: &'static str) -> Result<EventFd, DeviceError> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { what, source })
}

fn clone_fd(evt: &EventFd, what: &'static str) -> Result<EventFd, DeviceError> {
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
}

impl DeviceManager {
    /// Creates the legacy devices and registers their interrupts with `vm`.
    pub fn new(vm: &VmFd, console: &ConsoleConfig) -> Result<DeviceManager, DeviceError> {
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
        let serial = Arc::new(Mutex::new(Serial::new(
            IrqTrigger::new(serial_irq),
            sink,
            console_log.clone(),
            Some(clone_fd(&console_fifo_empty, "console input")?),
        )));
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
        })
    }
}
