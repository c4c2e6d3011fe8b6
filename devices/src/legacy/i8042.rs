//! The i8042 keyboard controller, reduced to what a microVM needs: the CPU reset command.
//!
//! A Linux guest booted with `reboot=k` restarts by polling the status port (0x64) until the
//! input buffer is empty and then writing `0xFE` (pulse the reset line) to it. A microVM has
//! nothing to reboot into, so the VMM treats that as the guest's request to stop: the device
//! signals `reset_evt` and the VMM ends the VM.
//!
//! Ports (relative to 0x60): data at offset 0, status/command at offset 4.

use log::warn;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Port range of the controller: 0x60..=0x64.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Length of the controller's port range.
pub const I8042_PORT_LEN: u64 = 5;

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 controller.
pub struct I8042 {
    reset_evt: EventFd,
    resets: u64,
}

impl I8042 {
    /// A controller that writes to `reset_evt` when the guest asks for a CPU reset.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            reset_evt,
            resets: 0,
        }
    }

    /// How many reset commands the guest has issued.
    pub fn resets(&self) -> u64 {
        self.resets
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty (the guest may send a command).
        // Data: nothing queued.
        match offset {
            DATA_OFFSET | COMMAND_OFFSET => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.resets += 1;
            if let Err(e) = self.reset_evt.write(1) {
                warn!("i8042: guest asked for a reset but signalling the VMM failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn reset_command_signals_the_vmm() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        let mut status = [0xaa];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(
            status,
            [0],
            "input buffer must read empty so the guest proceeds"
        );
        dev.write(COMMAND_OFFSET, &[0xaa]); // self-test: ignored
        assert!(evt.read().is_err(), "no reset for other commands");
        dev.write(DATA_OFFSET, &[CMD_RESET_CPU]); // a data write is not a command
        assert!(evt.read().is_err());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(dev.resets(), 1);
    }
}
