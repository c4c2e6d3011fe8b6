//! podvisor's emulated devices.
//!
//! Devices know nothing about the VMM beyond small traits: they are reached through a
//! [`bus::Bus`] (port I/O or MMIO), raise interrupts through an [`EventFd`]-backed trigger
//! (an irqfd registered by the VMM), and signal the VMM through event fds.
//!
//! * [`legacy`]: 16550 serial console, i8042 (reset only), and the boot timer.
//! * [`virtio`]: the virtio-mmio transport and virtio devices (block).
//!
//! [`EventFd`]: vmm_sys_util::eventfd::EventFd

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
