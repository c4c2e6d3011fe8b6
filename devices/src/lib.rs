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
pub mod confine;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

/// Puts `fd` on the event loop's epoll set (readable) if `want`, takes it off if not, and
/// records the result in `watched`; nothing to do if `watched` already equals `want`. For
/// subscribers that read a host fd only while they have room for what it brings.
pub(crate) fn set_watched(
    ops: &mut event_manager::EventOps,
    fd: std::os::fd::RawFd,
    want: bool,
    watched: &mut bool,
) -> Result<(), event_manager::Error> {
    if want == *watched {
        return Ok(());
    }
    let events = event_manager::Events::new_raw(fd, event_manager::EventSet::IN);
    if want {
        ops.add(events)?;
    } else {
        ops.remove(events)?;
    }
    *watched = want;
    Ok(())
}
