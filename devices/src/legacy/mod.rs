//! Legacy platform devices of the microVM: just enough PC for a Linux guest.
//!
//! * [`serial`]: a 16550A UART on port 0x3f8 (the guest console), IRQ 4 through an irqfd.
//! * [`i8042`]: the keyboard controller, only for its CPU-reset command (`reboot=k`).
//! * [`boot_timer`]: an MMIO byte a guest writes once its init has started.

pub mod boot_timer;
pub mod console_input;
pub mod i8042;
pub mod serial;

pub use boot_timer::{BootTimer, BOOT_TIMER_MAGIC};
pub use console_input::ConsoleInput;
pub use i8042::I8042;
pub use serial::{ConsoleLog, IrqTrigger, Serial, SerialPersist};
