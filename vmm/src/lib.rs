//! podvisor's in-process virtual machine monitor.
//!
//! The VMM knows nothing about containers: it boots a kernel with devices and runs it on
//! vCPU threads inside the calling process (the shim, or `podvisor boot`). Dependencies
//! point one way: `podvisor` → `vmm` → `devices` → rust-vmm crates.
//!
//! * [`config`]: what a VM is made of, validated up front.
//! * [`vm`]: creating, starting, pausing and stopping a VM.
//! * [`vcpu`]: vCPU boot state and threads; [`event_loop`]: the device event thread.
//! * [`memory`], [`loader`], [`arch`]: guest RAM, kernel/initrd loading, x86_64 boot set-up.
//! * [`device_manager`]: devices on buses, interrupts.
//! * [`snapshot`]: snapshots of a paused VM (format, host check) and restoring from them.
//! * [`host`]: host detection and its quirks; [`timings`]: boot timings and memory use.

pub mod arch;
pub mod config;
pub mod console_file;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
pub mod host;
pub mod loader;
pub mod memory;
pub mod seccomp;
pub mod snapshot;
pub mod timings;
pub mod vcpu;
pub mod vm;

pub use config::{ConsoleConfig, NetConfig, RestoreConfig, TapSource, VmConfig};
pub use exit::ExitReason;
pub use host::HostKind;
pub use snapshot::{SnapshotError, SnapshotInfo};
pub use timings::{BootTimings, MemoryUsage};
pub use vm::{snapshot_support, RunningVm, Vm, VmError, VmReport, VmStopHandle};

/// Locks `m`, recovering from poisoning: a panic on one thread must not take the VM's other
/// threads down with it.
pub(crate) fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
