//! Why a VM stopped, and the process exit status that goes with it.

use std::fmt;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 `0xFE`, `reboot=k`) without a kernel panic: a
    /// microVM has nothing to reboot into, so this is its clean power-off.
    GuestReset,
    /// KVM reported a guest shutdown system event (e.g. PSCI/ACPI power-off).
    GuestPowerOff,
    /// The guest kernel panicked (seen on its console), then reset.
    GuestPanic(String),
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault { cpu: usize },
    /// KVM reported a guest crash system event.
    GuestCrash { cpu: usize },
    /// KVM's instruction emulator could not run a guest instruction.
    EmulationFailure {
        cpu: usize,
        suberror: u32,
        rip: u64,
        /// Instruction bytes at RIP, when they could be read.
        bytes: Vec<u8>,
    },
    /// KVM could not enter the guest.
    FailEntry { cpu: usize, reason: u64 },
    /// A `KVM_RUN` error or an exit podvisor does not handle.
    VcpuError { cpu: usize, message: String },
    /// The VMM stopped the VM (host request, e.g. timeout or Ctrl-C).
    Stopped(String),
}

impl ExitReason {
    /// The process exit status for this reason: 0 for a clean stop, 1 for a guest failure,
    /// 3 for a VMM/KVM failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset | ExitReason::GuestPowerOff => 0,
            ExitReason::GuestPanic(_)
            | ExitReason::TripleFault { .. }
            | ExitReason::GuestCrash { .. } => 1,
            ExitReason::EmulationFailure { .. }
            | ExitReason::FailEntry { .. }
            | ExitReason::VcpuError { .. }
            | ExitReason::Stopped(_) => 3,
        }
    }

    /// Whether the guest stopped by itself, cleanly.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "guest powered off (reset through the i8042)"),
            ExitReason::GuestPowerOff => write!(f, "guest powered off"),
            ExitReason::GuestPanic(reason) => write!(f, "guest kernel panic: {reason}"),
            ExitReason::TripleFault { cpu } => {
                write!(f, "vCPU {cpu} triple-faulted (KVM_EXIT_SHUTDOWN)")
            }
            ExitReason::GuestCrash { cpu } => write!(f, "vCPU {cpu} reported a guest crash"),
            ExitReason::EmulationFailure {
                cpu,
                suberror,
                rip,
                bytes,
            } => {
                write!(
                    f,
                    "vCPU {cpu}: KVM could not emulate the instruction at RIP {rip:#x} \
                     (KVM_EXIT_INTERNAL_ERROR suberror {suberror}); bytes:"
                )?;
                if bytes.is_empty() {
                    write!(f, " unreadable")?;
                }
                for b in bytes {
                    write!(f, " {b:02x}")?;
                }
                Ok(())
            }
            ExitReason::FailEntry { cpu, reason } => {
                write!(
                    f,
                    "vCPU {cpu}: KVM could not enter the guest (hardware reason {reason:#x})"
                )
            }
            ExitReason::VcpuError { cpu, message } => write!(f, "vCPU {cpu}: {message}"),
            ExitReason::Stopped(why) => write!(f, "stopped by the VMM: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_messages() {
        assert_eq!(ExitReason::GuestReset.exit_code(), 0);
        assert_eq!(ExitReason::GuestPanic("x".into()).exit_code(), 1);
        assert_eq!(ExitReason::TripleFault { cpu: 0 }.exit_code(), 1);
        let e = ExitReason::EmulationFailure {
            cpu: 1,
            suberror: 1,
            rip: 0xffff_ffff_8100_0000,
            bytes: vec![0x0f, 0x01, 0xca],
        };
        assert_eq!(e.exit_code(), 3);
        let msg = e.to_string();
        assert!(
            msg.contains("0xffffffff81000000") && msg.ends_with("0f 01 ca"),
            "{msg}"
        );
    }
}

/// What the VM controller hears from vCPU threads and devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest wrote the boot-timer marker.
    InitStarted,
    /// The VM must stop, for this reason.
    Exit(ExitReason),
}
