//! podvisor's in-process virtual machine monitor.
//!
//! The VMM knows nothing about containers: it boots a kernel with devices and runs it on
//! vCPU threads inside the calling process (the shim, or `podvisor boot`). Dependencies
//! point one way: `podvisor` → `vmm` → `devices` → rust-vmm crates. It reads no
//! environment: every setting comes in its configuration.
//!
//! Public:
//! * [`config`]: what a VM is made of — the guest's shape ([`GuestShape`]) and this
//!   process's bindings for it ([`HostBindings`]) — validated up front.
//! * [`Vm`] (creating, starting, pausing and stopping a VM; [`Vm::restore`]) and what it
//!   reports ([`VmReport`], [`ExitReason`], [`BootTimings`]).
//! * [`VmStats`] (a running VM's exits and vCPU CPU time, for start timelines) and the
//!   `/proc` CPU-time readers it uses ([`stat_cpu_ticks`], [`clock_ticks_per_sec`]);
//!   a sampling profile of the guest's RIPs ([`GuestProfileHandle`], [`SymbolMap`]),
//!   a diagnostic that is off by default.
//! * [`snapshot`]: the snapshot format (also read by `podvisor template list` and the fuzz
//!   targets).
//!
//! Internal: `vm` (the VM and its controller), `vcpu` (vCPU boot state and threads),
//! `event_loop` (the device event thread), `memory`, `loader` and `arch` (guest RAM,
//! kernel/initrd loading, x86_64 boot set-up), `device_manager` (devices on buses,
//! interrupts), `host` (host detection and its quirks), `seccomp` (the VMM threads'
//! filters), `console_file` (the capped console log), `timings`, `stats` (exit counts and
//! vCPU CPU time for start timelines), `profile` (the guest sampler), `exit`.

mod arch;
pub mod config;
mod console_file;
mod device_manager;
mod event_loop;
mod exit;
mod host;
mod loader;
mod memory;
mod profile;
mod seccomp;
pub mod snapshot;
mod stats;
mod timings;
mod vcpu;
mod vm;

pub use config::{
    ConsoleConfig, GuestShape, HostBindings, HostQuirks, HostSettings, MemoryKnobs, RestoreConfig,
    SeccompMode, VmConfig,
};
pub use devices::virtio::balloon::{BalloonControl, BalloonStats};
pub use exit::ExitReason;
pub use host::HostKind;
pub use profile::{GuestProfileHandle, GuestSamples, SymbolMap};
pub use snapshot::{SnapshotError, SnapshotInfo};
pub use stats::{clock_ticks_per_sec, stat_cpu_ticks, VmStats, VmStatsHandle};
pub use timings::{BootTimings, MemoryUsage};
pub use vcpu::VcpuState;
pub use vm::{snapshot_support, RunningVm, Vm, VmError, VmReport, VmStopHandle};

/// The sizes of the host mappings that back a guest of `mem_mib` MiB of RAM, in guest
/// address order (one below the MMIO gap; a second above 4 GiB for larger guests): what
/// tells guest RAM apart from the VMM's own memory in `/proc/<pid>/smaps`.
pub fn guest_ram_mapping_sizes(mem_mib: u64) -> Vec<u64> {
    arch::layout::ram_regions(mem_mib << 20)
        .into_iter()
        .map(|(_, size)| size)
        .collect()
}

/// Locks `m`, recovering from poisoning: a panic on one thread must not take the VM's other
/// threads down with it.
pub(crate) fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
