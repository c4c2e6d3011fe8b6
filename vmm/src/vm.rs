//! The VM: KVM set-up, guest memory, devices, kernel loading, and the controller that runs
//! the vCPU threads and the event loop and decides when the VM is over.
//!
//! ```text
//! Vm::new(config)   open /dev/kvm, create the VM (irqchip, PIT), map + register RAM,
//!                   devices, load kernel/initrd, command line, MP table, boot info, vCPUs
//! Vm::start()       vCPU threads + event loop  -> RunningVm
//! RunningVm::wait   until the guest stops (or a timeout) -> VmReport; stops all threads
//! RunningVm::pause / resume
//! RunningVm::snapshot(dir)   a paused VM's state and memory (see `snapshot`)
//! Vm::restore(config)        a VM from a snapshot, ready to start where it was saved
//! ```

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use devices::legacy::ConsoleInput;
use devices::virtio::balloon::{Balloon, BalloonControl};
use devices::virtio::block::Block;
use devices::virtio::fs::Fs;
use devices::virtio::net::Net;
use devices::virtio::vsock::Vsock;
use devices::virtio::DeviceState;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::load_cmdline;
use log::{info, warn};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, PVH_INFO_START, ZERO_PAGE_START};
use crate::arch::regs::BootProtocol;
use crate::arch::{boot, mptable};
use crate::config::{
    ConfigError, ConsoleConfig, GuestShape, HostSettings, RestoreConfig, ShareBinding, VmConfig,
};
use crate::device_manager::{clone_fd, DeviceError, DeviceManager};
use crate::event_loop::{EventLoop, EventLoopError, Subscriber};
use crate::exit::{ExitReason, VmEvent};
use crate::host::HostKind;
use crate::loader::{self, LoaderError};
use crate::lock;
use crate::memory::{self, GuestMem, MemoryError};
use crate::profile::{GuestProfileHandle, Sampler};
use crate::snapshot::{
    self, DevicesState, HostFingerprint, KvmVmState, SnapshotError, SnapshotInfo, SnapshotState,
};
use crate::stats::{VmCounters, VmStatsHandle};
use crate::timings::{BootTimings, MemoryUsage};
use crate::vcpu::{self, SaveCaps, VcpuContext, VcpuError, VcpuHandle};

/// KVM API version podvisor is written for (stable since Linux 2.6.22).
const KVM_API_VERSION: i32 = 12;
/// Where KVM puts its real-mode TSS (three pages, inside the MMIO gap).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// What the controller's event-fd clones are for (in errors).
const CONTROLLER: &str = "the VM controller";
/// How long a pause may take before it is reported as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a snapshot waits for devices to finish requests in flight.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of VM creation and control.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "cannot open {path}: {source}; podvisor needs KVM: load kvm_intel or kvm_amd (or run on \
         a VM with nested virtualization) and give this user read/write access to /dev/kvm"
    )]
    KvmUnavailable {
        path: String,
        source: kvm_ioctls::Error,
    },
    #[error("/dev/kvm speaks KVM API {0}, podvisor needs {KVM_API_VERSION}")]
    KvmApiVersion(i32),
    #[error("this host's KVM lacks {0:?}, which podvisor needs")]
    KvmCapability(Cap),
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("virtio-fs share {tag:?}: {source}")]
    Share {
        tag: String,
        source: devices::virtio::fs::FsError,
    },
    #[error("cannot create the balloon device: {0}")]
    Balloon(std::io::Error),
    #[error("cannot start the guest profiler thread: {0}; run without profile_hz")]
    ProfileThread(std::io::Error),
    #[error("vsock {path}: {source}")]
    Vsock {
        path: std::path::PathBuf,
        source: devices::virtio::vsock::VsockError,
    },
    #[error("NIC {index} ({tap}): {source}")]
    Net {
        index: usize,
        tap: String,
        source: devices::virtio::net::NetError,
    },
    #[error("disk {path}: {source}")]
    Disk {
        path: std::path::PathBuf,
        source: devices::virtio::block::BlockError,
    },
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("invalid kernel command line {cmdline:?}: {reason}")]
    Cmdline { cmdline: String, reason: String },
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    #[error("vCPUs did not resume within {0:?}")]
    ResumeTimeout(Duration),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot start the thread that spawns device workers: {0}")]
    Spawner(std::io::Error),
}

impl VmError {
    /// Whether this restore error says the snapshot itself is unusable (not a snapshot,
    /// another format version, corrupt or missing files, taken on another host, devices
    /// that do not match what it saved), so that a cache of snapshots should drop it.
    /// Errors of this host or this VM's bindings (KVM, memory, sockets, taps, threads)
    /// say nothing about the snapshot: false.
    pub fn invalidates_snapshot(&self) -> bool {
        let VmError::Snapshot(e) = self else {
            return false;
        };
        match e {
            SnapshotError::NotASnapshot { .. }
            | SnapshotError::Version { .. }
            | SnapshotError::Corrupt { .. }
            | SnapshotError::ForeignHost { .. }
            | SnapshotError::DeviceCount { .. }
            | SnapshotError::Device { .. }
            | SnapshotError::Serial(_)
            | SnapshotError::VcpuCount { .. }
            | SnapshotError::ShapeMismatch { .. } => true,
            SnapshotError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::InvalidData
            ),
            SnapshotError::NotPaused
            | SnapshotError::EventLoopBusy(_)
            | SnapshotError::Busy { .. }
            | SnapshotError::Kvm { .. } => false,
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A created VM, ready to start.
pub struct Vm {
    config: VmConfig,
    host: HostKind,
    process_start: Instant,
    cmdline: String,
    save_caps: SaveCaps,
    // Field order matters for drop: vCPUs and the VM fd go before guest memory.
    vcpu_fds: Vec<VcpuFd>,
    devices: DeviceManager,
    vm_fd: VmFd,
    kvm: Kvm,
    mem: GuestMem,
}

impl Vm {
    /// Creates the VM described by `config`. `process_start` is when the process started
    /// (for the host set-up timing).
    pub fn new(mut config: VmConfig, process_start: Instant) -> Result<Vm, VmError> {
        config.validate()?;
        ensure_fd_budget(&mut config);
        crate::seccomp::set_mode(config.bindings.host.seccomp);
        // Before any thread is confined: confined threads start workers through it.
        devices::confine::start_spawner().map_err(VmError::Spawner)?;
        let (kvm, host, vm_fd) = create_kvm_vm(&config.bindings.host)?;
        let mem_size = config.mem_bytes();
        let mem = memory::create(mem_size, config.bindings.host.memory)?;
        memory::register(&vm_fd, &mem)?;
        let mut devices = DeviceManager::new(&vm_fd, &config.bindings.console, None)?;
        add_virtio_devices(&mut devices, &vm_fd, &mem, &config)?;

        let shape = &config.shape;
        let kernel = loader::load_kernel(&mem, &shape.kernel)?;
        let initrd = match &shape.initrd {
            Some(path) => Some(loader::load_initrd(
                &mem,
                mem_size,
                path,
                kernel.kernel_end,
            )?),
            None => None,
        };
        let mut vmm_words = devices.cmdline_words.clone();
        vmm_words.extend(host.cmdline_words());
        let slots = shape.vcpu_slots();
        if slots > shape.vcpus {
            // The other vCPUs wait parked until the guest brings them online.
            vmm_words.push(format!("maxcpus={}", shape.vcpus));
        }
        let cmdline = build_cmdline(&shape.cmdline, &vmm_words)?;
        load_cmdline(&mem, GuestAddress(CMDLINE_START), &cmdline).map_err(|e| {
            VmError::Cmdline {
                cmdline: shape.cmdline.clone(),
                reason: e.to_string(),
            }
        })?;
        let cmdline_str = cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        mptable::setup(&mem, slots)?;
        let boot_info = match kernel.protocol {
            BootProtocol::Pvh => {
                boot::write_pvh(&mem, mem_size, initrd)?;
                PVH_INFO_START
            }
            BootProtocol::Linux64 => {
                boot::write_linux_boot_params(
                    &mem,
                    mem_size,
                    kernel.setup_header,
                    cmdline_str.len() + 1,
                    initrd,
                )?;
                ZERO_PAGE_START
            }
        };
        info!(
            "kernel {} ({:?} entry at {:#x}), initrd {:?}, {} vCPU(s) ({} parked), {} MiB, cmdline: {cmdline_str}",
            shape.kernel.display(),
            kernel.protocol,
            kernel.entry,
            initrd,
            shape.vcpus,
            slots - shape.vcpus,
            shape.mem_mib
        );

        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let save_caps = save_caps(&kvm)?;
        let msr_list = &save_caps.msr_list;
        let mut vcpu_fds = Vec::with_capacity(slots);
        for id in 0..slots {
            let boot = (id == 0).then_some((&mem, kernel.protocol, kernel.entry, boot_info));
            vcpu_fds.push(vcpu::create(
                &vm_fd,
                id,
                slots,
                &supported_cpuid,
                host.cpuid_masks(),
                msr_list,
                boot,
            )?);
        }

        Ok(Vm {
            config,
            host,
            process_start,
            cmdline: cmdline_str,
            save_caps,
            vcpu_fds,
            devices,
            vm_fd,
            kvm,
            mem,
        })
    }

    /// Creates a VM from the snapshot in `restore.snapshot`, bound to `restore`'s bindings;
    /// [`Vm::start`] resumes the guest where it was saved.
    ///
    /// Guest memory is the snapshot's memory file mapped `MAP_PRIVATE` (see
    /// [`crate::snapshot`]); the snapshot is checked (format, checksum, the shape the
    /// caller expects, host) before anything is created. The guest's clock continues from the saved kvm-clock value
    /// (no time passed for it); setting its wall clock, reseeding its RNG and everything
    /// else per clone is up to the caller, through the guest.
    pub fn restore(restore: &RestoreConfig, process_start: Instant) -> Result<Vm, VmError> {
        crate::seccomp::set_mode(restore.bindings.host.seccomp);
        devices::confine::start_spawner().map_err(VmError::Spawner)?;
        let dir = &restore.snapshot;
        let state = SnapshotState::read(dir)?;
        if let Some(expected) = &restore.shape {
            SnapshotError::check_shape(&state.shape, expected)?;
        }
        let saved_nics: Vec<_> = state
            .devices
            .virtio
            .iter()
            .filter_map(|d| match &d.device {
                DeviceState::Net(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        let mut config = restore.apply(&state.shape, &saved_nics)?;
        ensure_fd_budget(&mut config);
        config.validate_devices()?;
        if state.vcpus.len() != config.shape.vcpu_slots() {
            return Err(SnapshotError::VcpuCount {
                saved: state.vcpus.len(),
                current: config.shape.vcpu_slots(),
            }
            .into());
        }
        let (kvm, host, vm_fd) = create_kvm_vm(&config.bindings.host)?;
        state
            .host
            .check(&HostFingerprint::of_this_host(&kvm, host)?)?;
        if restore.verify_memory {
            snapshot::verify_memory(dir, &state.memory)?;
        }
        let mem = memory::map_snapshot(
            &dir.join(snapshot::MEMORY_FILE),
            &state.memory,
            config.bindings.host.memory,
        )?;
        memory::register(&vm_fd, &mem)?;

        // VM, then vCPUs, then devices: a device that raises its saved pending interrupt
        // again must find the interrupt controllers already restored.
        restore_kvm_vm_state(
            &vm_fd,
            &state.vm,
            restore.advance_clock || host.restore_advances_clock(),
        )?;
        let vcpu_fds = state
            .vcpus
            .iter()
            .enumerate()
            .map(|(id, s)| vcpu::restore(&vm_fd, id, s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut devices = DeviceManager::new(
            &vm_fd,
            &config.bindings.console,
            Some(&state.devices.serial),
        )?;
        add_virtio_devices(&mut devices, &vm_fd, &mem, &config)?;
        if devices.virtio.len() != state.devices.virtio.len() {
            return Err(SnapshotError::DeviceCount {
                saved: state.devices.virtio.len(),
                current: devices.virtio.len(),
            }
            .into());
        }
        for (index, (transport, saved)) in
            devices.virtio.iter().zip(&state.devices.virtio).enumerate()
        {
            lock(transport)
                .restore(saved)
                .map_err(|source| SnapshotError::Device { index, source })?;
        }
        info!(
            "restored from {} ({} vCPU(s), {} MiB, {} MiB of data in the snapshot)",
            dir.display(),
            config.shape.vcpus,
            config.shape.mem_mib,
            state.memory.data_pages * 4 / 1024
        );
        Ok(Vm {
            config,
            host,
            process_start,
            cmdline: state.cmdline,
            save_caps: save_caps(&kvm)?,
            vcpu_fds,
            devices,
            vm_fd,
            kvm,
            mem,
        })
    }

    /// What the guest sees (for a restored VM: the snapshot's shape).
    pub fn shape(&self) -> &GuestShape {
        &self.config.shape
    }

    /// The final kernel command line (with the VMM's own words).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The KVM VM (devices register ioeventfds and irqfds on it).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// The kind of host the VM runs on.
    pub fn host(&self) -> HostKind {
        self.host
    }

    /// Starts the vCPU threads and the event loop.
    pub fn start(self) -> Result<RunningVm, VmError> {
        self.spawn(false)
    }

    /// Starts the threads with every vCPU paused before its first `KVM_RUN`: the guest
    /// runs from [`RunningVm::resume`] on (e.g. a restored VM the caller prepares first,
    /// or saves again untouched).
    pub fn start_paused(self) -> Result<RunningVm, VmError> {
        let running = self.spawn(true)?;
        running.pause()?;
        Ok(running)
    }

    fn spawn(mut self, paused: bool) -> Result<RunningVm, VmError> {
        let (events_tx, events_rx) = mpsc::channel();
        let first_run = Arc::new(OnceLock::new());
        let pio = Arc::new(std::mem::take(&mut self.devices.pio));
        let mmio = Arc::new(std::mem::take(&mut self.devices.mmio));

        let mut subscribers: Vec<Subscriber> = vec![Arc::new(Mutex::new(Notifier {
            watched: vec![
                (
                    clone_fd(&self.devices.reset_evt, CONTROLLER)?,
                    VmEvent::Exit(ExitReason::GuestReset),
                ),
                (
                    clone_fd(&self.devices.init_evt, CONTROLLER)?,
                    VmEvent::InitStarted,
                ),
            ],
            tx: events_tx.clone(),
        }))];
        subscribers.append(&mut self.devices.subscribers);
        if self.config.bindings.console == ConsoleConfig::Stdio {
            subscribers.push(Arc::new(Mutex::new(ConsoleInput::new(
                self.devices.serial.clone(),
                std::io::stdin().as_raw_fd(),
                clone_fd(&self.devices.console_fifo_empty, CONTROLLER)?,
            ))));
        }
        let event_loop = EventLoop::start(subscribers)?;

        let mut vcpus = Vec::with_capacity(self.vcpu_fds.len());
        let counters = Arc::new(VmCounters::new(self.vcpu_fds.len()));
        let sampler = match self.config.bindings.host.profile_hz {
            0 => None,
            hz => Some(
                Sampler::start(hz, counters.clone(), self.vcpu_fds.len())
                    .map_err(VmError::ProfileThread)?,
            ),
        };
        for (id, fd) in std::mem::take(&mut self.vcpu_fds).into_iter().enumerate() {
            let ctx = VcpuContext {
                pio: pio.clone(),
                mmio: mmio.clone(),
                mem: self.mem.clone(),
                exits: events_tx.clone(),
                first_run: first_run.clone(),
                save: self.save_caps.clone(),
                counters: counters.clone(),
                profile: sampler.as_ref().map(Sampler::shared),
            };
            match VcpuHandle::spawn(id, fd, ctx, paused) {
                Ok(handle) => vcpus.push(handle),
                Err(e) => {
                    vcpus.into_iter().for_each(VcpuHandle::stop);
                    event_loop.stop();
                    return Err(e.into());
                }
            }
        }
        Ok(RunningVm {
            vm: self,
            vcpus,
            event_loop: Some(event_loop),
            stop: VmStopHandle { tx: events_tx },
            events: events_rx,
            first_run,
            stats: VmStatsHandle(counters),
            sampler,
            memory_at_init: None,
            ended: None,
        })
    }
}

/// Opens the KVM device at `path` (`/dev/kvm`, or another node: tests simulate a host
/// without KVM with one that does not exist).
fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let unavailable = |source| VmError::KvmUnavailable {
        path: path.display().to_string(),
        source,
    };
    let c_path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .map_err(|_| unavailable(kvm_ioctls::Error::new(libc::EINVAL)))?;
    Kvm::new_with_path(&c_path).map_err(unavailable)
}

/// Descriptors the VMM keeps for itself beyond what its shares may pin: guest memory,
/// KVM, event fds, vsock streams, taps, and the shim's own sockets.
const FD_RESERVE: u64 = 4096;

/// Makes sure the process may open what `config`'s shares may pin (their caps) plus
/// [`FD_RESERVE`]: raises the soft `RLIMIT_NOFILE` up to the hard one where it is lower,
/// and where even the hard limit is lower, lowers the shares' caps to fit under it (a guest
/// holding many files then gets ENFILE sooner, instead of starving the VMM of fds).
fn ensure_fd_budget(config: &mut VmConfig) {
    let needed = shares_fds(&config.bindings.shares) + FD_RESERVE;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= needed {
        return;
    }
    let want = needed.min(lim.rlim_max);
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit reads one rlimit.
    let raised = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0;
    let limit = if raised { want } else { lim.rlim_cur };
    if raised {
        info!("RLIMIT_NOFILE raised from {} to {want}", lim.rlim_cur);
    }
    if limit < needed {
        fit_share_limits(
            &mut config.bindings.shares,
            limit.saturating_sub(FD_RESERVE),
        );
        warn!(
            "RLIMIT_NOFILE is {limit}, below the {needed} descriptors the shares' caps and the \
             VMM's reserve need: the shares' caps are lowered to {} descriptors in all (raise \
             LimitNOFILE of containerd's service for the full caps)",
            shares_fds(&config.bindings.shares)
        );
    }
}

fn shares_fds(shares: &[ShareBinding]) -> u64 {
    shares.iter().map(|s| s.limits.fds()).sum()
}

/// Scales every share's inode and handle caps down by the same factor so that together
/// they fit in `available` descriptors (each cap at least 1).
fn fit_share_limits(shares: &mut [ShareBinding], available: u64) {
    let total = shares_fds(shares);
    if total <= available || total == 0 {
        return;
    }
    for s in shares.iter_mut() {
        let l = &mut s.limits;
        // available < total: the scaled cap is below n, so it fits where n did.
        let scale =
            |n: usize| usize::try_from(n as u64 * available / total).map_or(n, |m| m.max(1));
        l.max_inodes = scale(l.max_inodes);
        l.max_handles = scale(l.max_handles);
    }
}

/// Opens KVM, checks what podvisor needs, and creates a VM with the in-kernel irqchip and
/// PIT (the same for a booted and a restored VM).
fn create_kvm_vm(settings: &HostSettings) -> Result<(Kvm, HostKind, VmFd), VmError> {
    let kvm = open_kvm(&settings.kvm_device)?;
    let api = kvm.get_api_version();
    if api != KVM_API_VERSION {
        return Err(VmError::KvmApiVersion(api));
    }
    for cap in [
        Cap::Irqchip,
        Cap::Irqfd,
        Cap::Ioeventfd,
        Cap::UserMemory,
        Cap::Pit2,
        Cap::ImmediateExit,
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::KvmCapability(cap));
        }
    }
    let host = HostKind::detect(settings.quirks);
    if host == HostKind::NestedPvm {
        info!(
            "nested PVM host detected (kvm_pvm): masking CX16/XSAVE/POPCNT/SMAP and KVM PV IPIs in \
             CPUID, adding {:?} to the kernel command line",
            host.cmdline_words()
        );
    }

    let vm_fd = kvm.create_vm().map_err(kvm_err("VM creation"))?;
    vm_fd
        .set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("the TSS address"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd
        .create_pit2(pit)
        .map_err(kvm_err("the in-kernel PIT"))?;
    Ok((kvm, host, vm_fd))
}

/// Whether the KVM at `kvm_device` can save and restore a VM (what templates need): the
/// state ioctls of [`crate::snapshot`] beyond those every VM needs. `Err` names what is
/// missing.
pub fn snapshot_support(kvm_device: &Path) -> Result<(), VmError> {
    let kvm = open_kvm(kvm_device)?;
    for cap in [
        Cap::AdjustClock,
        Cap::VcpuEvents,
        Cap::MpState,
        Cap::Pit2,
        Cap::Irqchip,
        Cap::Xsave,
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::KvmCapability(cap));
        }
    }
    kvm.get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(())
}

/// What saving vCPUs needs from this host's KVM.
fn save_caps(kvm: &Kvm) -> Result<SaveCaps, VmError> {
    let msr_list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(SaveCaps {
        msr_list: msr_list.as_slice().into(),
        xcrs: kvm.check_extension(Cap::Xcrs),
    })
}

/// The configuration's virtio devices, in MMIO window order: disks, shares, vsock, NICs,
/// the balloon.
fn add_virtio_devices(
    devices: &mut DeviceManager,
    vm_fd: &VmFd,
    mem: &GuestMem,
    config: &VmConfig,
) -> Result<(), VmError> {
    for disk in config.disk_configs() {
        let block = Block::new(&disk).map_err(|e| VmError::Disk {
            path: disk.path.clone(),
            source: e,
        })?;
        devices.add_virtio(vm_fd, mem, Box::new(block))?;
    }
    for share in config.share_configs() {
        let tag = share.tag.clone();
        let fs = Fs::new(share).map_err(|source| VmError::Share { tag, source })?;
        devices.add_virtio(vm_fd, mem, Box::new(fs))?;
    }
    if let (Some(v), Some(uds_path)) = (&config.shape.vsock, &config.bindings.vsock) {
        let vsock = Vsock::new(v.guest_cid, uds_path).map_err(|source| VmError::Vsock {
            path: uds_path.clone(),
            source,
        })?;
        devices.add_virtio(vm_fd, mem, Box::new(vsock))?;
    }
    for (index, nic) in config.nic_configs().iter().enumerate() {
        let net = Net::new(nic).map_err(|source| VmError::Net {
            index,
            tap: nic.tap.to_string(),
            source,
        })?;
        devices.add_virtio(vm_fd, mem, Box::new(net))?;
    }
    if config.shape.balloon {
        let balloon = Balloon::new().map_err(VmError::Balloon)?;
        devices.balloon = Some(balloon.control());
        devices.add_virtio(vm_fd, mem, Box::new(balloon))?;
    }
    Ok(())
}

fn irqchip(vm_fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm_fd
        .get_irqchip(&mut chip)
        .map_err(|source| SnapshotError::Kvm {
            what: "KVM_GET_IRQCHIP",
            source,
        })?;
    Ok(chip)
}

/// The in-kernel PIC, IOAPIC, PIT and kvm-clock of `vm_fd`.
fn save_kvm_vm_state(vm_fd: &VmFd) -> Result<KvmVmState, SnapshotError> {
    let kvm = |what| move |source| SnapshotError::Kvm { what, source };
    Ok(KvmVmState {
        pic_master: irqchip(vm_fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm_fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm_fd, KVM_IRQCHIP_IOAPIC)?,
        pit: vm_fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm_fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// Puts back what [`save_kvm_vm_state`] saved. Unless `advance_clock`, the clock is set
/// with no flags: guest uptime continues from the saved value instead of jumping by the
/// time the snapshot sat on disk (which the saved KVM_CLOCK_REALTIME flag makes KVM do).
fn restore_kvm_vm_state(
    vm_fd: &VmFd,
    s: &KvmVmState,
    advance_clock: bool,
) -> Result<(), SnapshotError> {
    let kvm = |what| move |source| SnapshotError::Kvm { what, source };
    vm_fd.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))?;
    let mut clock = s.clock;
    if !advance_clock {
        clock.flags = 0;
    }
    vm_fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm_fd.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// The user's command line plus the VMM's words (devices, host quirks).
fn build_cmdline(user: &str, vmm_words: &[String]) -> Result<Cmdline, VmError> {
    let err = |reason: String| VmError::Cmdline {
        cmdline: user.to_string(),
        reason,
    };
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| err(e.to_string()))?;
    // Init arguments ("-- ...") must stay last: insert VMM words before them.
    let (kernel_part, init_part) = match user.split_once(" -- ") {
        Some((k, i)) => (k, Some(i)),
        None => (user, None),
    };
    if !kernel_part.trim().is_empty() {
        cmdline
            .insert_str(kernel_part.trim())
            .map_err(|e| err(e.to_string()))?;
    }
    for word in vmm_words {
        cmdline.insert_str(word).map_err(|e| err(e.to_string()))?;
    }
    if let Some(init) = init_part {
        cmdline
            .insert_init_args(init.trim())
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(cmdline)
}

/// Turns event-fd signals from devices into controller events.
struct Notifier {
    watched: Vec<(EventFd, VmEvent)>,
    tx: Sender<VmEvent>,
}

impl MutEventSubscriber for Notifier {
    fn init(&mut self, ops: &mut EventOps) {
        for (evt, _) in &self.watched {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                warn!("cannot watch a device notification: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        for (evt, event) in &self.watched {
            if evt.as_raw_fd() == events.fd() {
                let _ = evt.read();
                let _ = self.tx.send(event.clone());
            }
        }
    }
}

/// What a finished VM reports.
#[derive(Debug, Clone)]
pub struct VmReport {
    pub reason: ExitReason,
    pub timings: BootTimings,
    /// The last lines of the guest console.
    pub console_tail: String,
}

/// Stops a running VM from any thread: the thread in [`RunningVm::wait`] returns with
/// [`ExitReason::Stopped`] (e.g. a guest that ignores its agent's shutdown).
#[derive(Clone)]
pub struct VmStopHandle {
    tx: Sender<VmEvent>,
}

impl VmStopHandle {
    /// Asks the VM to stop; a no-op if it has already stopped.
    pub fn stop(&self, why: &str) {
        let _ = self
            .tx
            .send(VmEvent::Exit(ExitReason::Stopped(why.to_string())));
    }
}

/// A running VM.
pub struct RunningVm {
    vm: Vm,
    vcpus: Vec<VcpuHandle>,
    event_loop: Option<EventLoop>,
    stop: VmStopHandle,
    events: Receiver<VmEvent>,
    first_run: Arc<OnceLock<Instant>>,
    stats: VmStatsHandle,
    /// The guest profiler, when asked for.
    sampler: Option<Sampler>,
    memory_at_init: Option<MemoryUsage>,
    /// Why the VM ended, if it did while [`RunningVm::wait_for_init`] waited.
    ended: Option<ExitReason>,
}

impl RunningVm {
    /// A handle that stops this VM from another thread.
    pub fn stop_handle(&self) -> VmStopHandle {
        self.stop.clone()
    }

    /// The VM's exit counts and vCPU CPU time, readable from any thread.
    pub fn stats(&self) -> VmStatsHandle {
        self.stats.clone()
    }

    /// The guest profile's samples, when the VM is profiled
    /// ([`HostSettings::profile_hz`](crate::HostSettings)).
    pub fn profile(&self) -> Option<GuestProfileHandle> {
        self.sampler.as_ref().map(Sampler::handle)
    }

    /// When vCPU 0 first entered `KVM_RUN` (the guest started running), once it has.
    pub fn first_run(&self) -> Option<Instant> {
        self.first_run.get().copied()
    }

    /// The host's handle on the VM's balloon, if its shape has one: set how much memory the
    /// guest gives back, read what it did.
    pub fn balloon(&self) -> Option<BalloonControl> {
        self.vm.devices.balloon.clone()
    }

    /// Pauses every vCPU (outside `KVM_RUN`, state consistent for saving).
    pub fn pause(&self) -> Result<(), VmError> {
        for v in &self.vcpus {
            if !v.pause(PAUSE_TIMEOUT) {
                return Err(VmError::PauseTimeout(PAUSE_TIMEOUT));
            }
        }
        Ok(())
    }

    /// Resumes every vCPU; returns once all run again.
    pub fn resume(&self) -> Result<(), VmError> {
        for v in &self.vcpus {
            if !v.resume(PAUSE_TIMEOUT) {
                return Err(VmError::ResumeTimeout(PAUSE_TIMEOUT));
            }
        }
        Ok(())
    }

    /// Whether every vCPU is paused.
    pub fn is_paused(&self) -> bool {
        self.vcpus.iter().all(VcpuHandle::is_paused)
    }

    /// Saves the paused VM into `dir` (created if missing; an existing snapshot there is
    /// replaced): memory file first, `state` last. Devices must be quiescent: the event
    /// loop is paused meanwhile, and requests the devices already took from the guest
    /// are waited for (up to a few seconds, then the snapshot fails). The VM stays paused;
    /// [`RunningVm::resume`] lets it go on, as does any clone restored from `dir`.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, VmError> {
        if !self.is_paused() {
            return Err(SnapshotError::NotPaused.into());
        }
        let event_loop = self.event_loop.as_ref().ok_or(SnapshotError::NotPaused)?;
        if !event_loop.pause(PAUSE_TIMEOUT) {
            event_loop.resume();
            return Err(SnapshotError::EventLoopBusy(PAUSE_TIMEOUT).into());
        }
        let result = self.save_paused(dir);
        event_loop.resume();
        result
    }

    fn save_paused(&self, dir: &Path) -> Result<SnapshotInfo, VmError> {
        let started = Instant::now();
        let devices = self.quiescent_devices()?;
        let vm = save_kvm_vm_state(&self.vm.vm_fd)?;
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| v.save_state(PAUSE_TIMEOUT))
            .collect::<Result<Vec<_>, _>>()?;
        // Guest memory holds the guest's secrets: owner only.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(dir)
            .map_err(|source| SnapshotError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        let memory_tmp = dir.join(snapshot::MEMORY_TMP);
        let memory = memory::save(&self.vm.mem, &memory_tmp).inspect_err(|_| {
            let _ = std::fs::remove_file(&memory_tmp);
        })?;
        let state = SnapshotState {
            host: HostFingerprint::of_this_host(&self.vm.kvm, self.vm.host)?,
            podvisor_version: env!("CARGO_PKG_VERSION").to_string(),
            shape: self.vm.config.shape.clone(),
            cmdline: self.vm.cmdline.clone(),
            memory: memory.clone(),
            vm,
            vcpus,
            devices,
        };
        let state_bytes = state.commit(dir)?;
        let info = SnapshotInfo {
            dir: dir.to_path_buf(),
            state_bytes,
            memory_bytes: memory.size,
            memory_data_bytes: memory.data_pages * 4096,
        };
        info!(
            "snapshot saved to {} in {:.1} ms: state {} KiB, memory {} MiB of which {} MiB data",
            dir.display(),
            started.elapsed().as_secs_f64() * 1e3,
            info.state_bytes / 1024,
            info.memory_bytes >> 20,
            info.memory_data_bytes >> 20
        );
        Ok(info)
    }

    /// The devices' state once no request is in flight.
    fn quiescent_devices(&self) -> Result<DevicesState, SnapshotError> {
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        loop {
            let virtio: Vec<_> = self
                .vm
                .devices
                .virtio
                .iter()
                .map(|t| lock(t).save())
                .collect();
            let busy = virtio
                .iter()
                .enumerate()
                .find_map(|(i, d)| d.in_flight().map(|(q, n)| (i, d.device.kind(), q, n)));
            match busy {
                None => {
                    return Ok(DevicesState {
                        serial: lock(&self.vm.devices.serial).state(),
                        virtio,
                    })
                }
                Some((index, kind, queue, count)) if Instant::now() >= deadline => {
                    return Err(SnapshotError::Busy {
                        index,
                        kind,
                        queue,
                        count,
                        waited: QUIESCE_TIMEOUT,
                    })
                }
                Some(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// Whether the guest has written the boot-timer marker.
    pub fn init_started(&self) -> bool {
        self.vm.devices.init_marked.get().is_some()
    }

    /// Waits until the guest stops, or `timeout` passes (then the VM is stopped); stops all
    /// threads and reports.
    pub fn wait(mut self, timeout: Option<Duration>) -> VmReport {
        let deadline = timeout.map(|t| Instant::now() + t);
        let reason = loop {
            if let Some(reason) = self.ended.take() {
                break reason;
            }
            if let Some(reason) = self.next_event(deadline, timeout) {
                break reason;
            }
        };
        self.finish(reason)
    }

    /// Waits until the guest's init has started (boot-timer marker). `Err` if the VM ended
    /// first or `timeout` passed: [`RunningVm::wait`] then reports why at once.
    pub fn wait_for_init(&mut self, timeout: Option<Duration>) -> Result<(), ExitReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        while !self.init_started() {
            if let Some(reason) = self.ended.clone() {
                return Err(reason);
            }
            if let Some(reason) = self.next_event(deadline, timeout) {
                self.ended = Some(reason.clone());
                return Err(reason);
            }
        }
        Ok(())
    }

    /// Handles the next controller event; the reason the VM ends, if it does.
    fn next_event(
        &mut self,
        deadline: Option<Instant>,
        timeout: Option<Duration>,
    ) -> Option<ExitReason> {
        let event = match deadline {
            Some(d) => match self
                .events
                .recv_timeout(d.saturating_duration_since(Instant::now()))
            {
                Ok(e) => e,
                Err(RecvTimeoutError::Timeout) => {
                    return Some(ExitReason::Stopped(format!(
                        "timed out after {:?}",
                        timeout.unwrap_or_default()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Some(ExitReason::Stopped("all vCPUs gone".into()))
                }
            },
            None => match self.events.recv() {
                Ok(e) => e,
                Err(_) => return Some(ExitReason::Stopped("all vCPUs gone".into())),
            },
        };
        match event {
            VmEvent::InitStarted => {
                self.record_init_memory();
                None
            }
            VmEvent::Exit(reason) => Some(reason),
        }
    }

    /// Stops the VM now.
    pub fn stop(self, why: &str) -> VmReport {
        self.finish(ExitReason::Stopped(why.to_string()))
    }

    /// This process's memory now, split at guest RAM (for a restored VM: shared snapshot
    /// pages and private copies, see [`MemoryUsage`]).
    pub fn memory_usage(&self) -> std::io::Result<MemoryUsage> {
        MemoryUsage::measure(&memory::host_ranges(&self.vm.mem))
    }

    fn record_init_memory(&mut self) {
        match self.memory_usage() {
            Ok(usage) => self.memory_at_init = Some(usage),
            Err(e) => warn!("cannot measure memory use: {e}"),
        }
    }

    fn finish(mut self, reason: ExitReason) -> VmReport {
        let stopped = Instant::now();
        for v in std::mem::take(&mut self.vcpus) {
            v.stop();
        }
        if let Some(l) = self.event_loop.take() {
            l.stop();
        }
        // A panic shows up as a reset (panic=-1 reboots through the i8042): tell them apart
        // by the console.
        let log = lock(&self.vm.devices.console_log);
        let reason = match (reason, log.panic_reason()) {
            (ExitReason::GuestReset, Some(panic)) => ExitReason::GuestPanic(panic.to_string()),
            (reason, _) => reason,
        };
        let mut timings = BootTimings::from_instants(
            self.vm.process_start,
            self.first_run.get().copied(),
            self.vm.devices.init_marked.get().copied(),
            stopped,
        );
        timings.memory_at_init = self.memory_at_init;
        timings.memory_at_stop = self.memory_usage().ok();
        VmReport {
            reason,
            timings,
            console_tail: log.tail_lines(20),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_caps_shrink_to_fit_the_descriptors_there_are() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let share = || ShareBinding {
            dir: dir.as_path().to_path_buf(),
            limits: Default::default(),
        };
        let mut shares = vec![share(), share()];
        let full = shares_fds(&shares);
        fit_share_limits(&mut shares, full);
        assert_eq!(shares_fds(&shares), full, "room enough: unchanged");
        // A hard limit of 20,000 (seen under a containerd with LimitNOFILE=20000).
        fit_share_limits(&mut shares, 20_000 - FD_RESERVE);
        assert!(shares_fds(&shares) <= 20_000 - FD_RESERVE, "{shares:?}");
        let l = shares[0].limits;
        assert!(l.max_inodes > l.max_handles && l.max_handles > 0, "{l:?}");
        fit_share_limits(&mut shares, 0);
        assert_eq!(shares[1].limits.max_inodes, 1);
    }

    #[test]
    fn cmdline_gets_host_words_before_init_args() {
        let c = build_cmdline(
            "console=ttyS0 quiet -- -v",
            &HostKind::NestedPvm.cmdline_words(),
        )
        .unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert!(s.starts_with("console=ttyS0 quiet noxsave"), "{s}");
        assert!(s.ends_with(" -- -v"), "{s}");
        let c = build_cmdline("console=ttyS0", &HostKind::Native.cmdline_words()).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().into_string().unwrap(),
            "console=ttyS0"
        );
    }

    #[test]
    fn only_snapshot_faults_invalidate_a_snapshot() {
        let path = std::path::PathBuf::from("/t");
        let io = |kind| {
            VmError::Snapshot(SnapshotError::Io {
                path: path.clone(),
                source: std::io::Error::from(kind),
            })
        };
        let invalid = [
            VmError::Snapshot(SnapshotError::Version {
                path: path.clone(),
                found: 0,
            }),
            VmError::Snapshot(SnapshotError::Corrupt {
                path: path.clone(),
                reason: "x".into(),
            }),
            VmError::Snapshot(SnapshotError::VcpuCount {
                saved: 1,
                current: 2,
            }),
            VmError::Snapshot(SnapshotError::ShapeMismatch {
                field: "vcpus".into(),
                saved: "1".into(),
                restoring: "2".into(),
            }),
            io(std::io::ErrorKind::NotFound),
        ];
        for e in invalid {
            assert!(e.invalidates_snapshot(), "{e}");
        }
        let unrelated = [
            io(std::io::ErrorKind::OutOfMemory),
            io(std::io::ErrorKind::PermissionDenied),
            VmError::KvmApiVersion(1),
            VmError::Spawner(std::io::Error::from(std::io::ErrorKind::WouldBlock)),
            VmError::Snapshot(SnapshotError::NotPaused),
            VmError::PauseTimeout(Duration::from_secs(1)),
            VmError::Config(ConfigError::BindingCount {
                what: "disk",
                shape: 1,
                bound: 2,
            }),
        ];
        for e in unrelated {
            assert!(!e.invalidates_snapshot(), "{e}");
        }
    }

    #[test]
    fn oversized_cmdline_is_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            build_cmdline(&long, &[]),
            Err(VmError::Cmdline { .. })
        ));
    }
}
