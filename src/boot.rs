//! `podvisor boot`: one VM in this process, console on stdio or in a file; optionally saved
//! to a snapshot once its init has started (`--snapshot`), or restored from one
//! (`--restore`) instead of booted.
//!
//! The arguments split into the guest's shape (kernel, command line, vCPUs, memory, the
//! devices' guest-visible side) and this process's bindings (console, the devices' files,
//! socket and taps, and the host settings, which also come from the `PODVISOR_*`
//! environment the shim reads: [`HostArgs`]). A restore takes the snapshot's shape and only
//! the bindings; what the device arguments say of the shape must match the snapshot's.

mod spec;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use podvisor_shim::config::{
    parse_host_quirks, parse_ksm, parse_noreserve, HOST_QUIRKS_ENV, KSM_ENV, KVM_DEVICE_ENV,
    NORESERVE_ENV,
};
use spec::{parse_disk, parse_net};
use vmm::config::{
    split_share, BlockConfig, GuestShape, HostBindings, NetConfig, ShareConfig, DEFAULT_CMDLINE,
    DEFAULT_GUEST_CID, DEFAULT_KVM_DEVICE,
};
use vmm::{
    BootTimings, ConsoleConfig, HostQuirks, HostSettings, MemoryKnobs, RestoreConfig, RunningVm,
    SnapshotError, Vm, VmConfig,
};

/// The VMM's host settings, from the same `PODVISOR_*` variables the shim reads (the
/// options are for one-off runs; tests and `podvisor bench` set the variables).
#[derive(Args, Debug, Clone)]
pub struct HostArgs {
    /// The KVM device node.
    #[arg(long, env = KVM_DEVICE_ENV, default_value = DEFAULT_KVM_DEVICE, hide = true)]
    pub kvm_device: PathBuf,
    /// Host quirks: `pvm` or `none` force them, anything else detects them.
    #[arg(long, env = HOST_QUIRKS_ENV, value_name = "pvm|none", value_parser = parse_host_quirks,
          default_value = "auto", hide = true)]
    pub host_quirks: HostQuirks,
    /// `0`: guest RAM without MAP_NORESERVE.
    #[arg(long, env = NORESERVE_ENV, value_name = "0|1", value_parser = parse_noreserve,
          default_value = "1", action = clap::ArgAction::Set, hide = true)]
    pub noreserve: bool,
    /// `1`: guest RAM mergeable by KSM.
    #[arg(long, env = KSM_ENV, value_name = "0|1", value_parser = parse_ksm, default_value = "0",
          action = clap::ArgAction::Set, hide = true)]
    pub ksm: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BootArgs {
    /// Guest kernel: ELF vmlinux (PVH entry) or bzImage.
    #[arg(long, env = "PODVISOR_KERNEL", required_unless_present = "restore")]
    pub kernel: Option<PathBuf>,
    /// Initramfs (newc cpio).
    #[arg(long, env = "PODVISOR_INITRD")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (podvisor appends the words this host needs).
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs online at boot.
    #[arg(long, default_value_t = 1)]
    pub vcpus: usize,
    /// vCPUs the guest may bring online later (`echo 1 > /sys/devices/system/cpu/cpuN/online`);
    /// those beyond --vcpus wait parked.
    #[arg(long)]
    pub max_vcpus: Option<usize>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    pub mem_mib: u64,
    /// A virtio-blk disk, `PATH[,ro]` (repeatable; the guest sees /dev/vda, /dev/vdb, ...).
    #[arg(long = "disk", value_name = "PATH[,ro]", value_parser = parse_disk)]
    pub disks: Vec<BlockConfig>,
    /// A virtio-fs share, `TAG=DIR[,ro][,cache=never|auto|always][,xattr=on|off]`
    /// (repeatable; in the guest: `mount -t virtiofs TAG /mnt`).
    #[arg(long = "share", value_name = "TAG=DIR[,ro]")]
    pub shares: Vec<ShareConfig>,
    /// virtio-vsock through a Unix socket at this path (host -> guest: connect and send
    /// `CONNECT <port>`; guest -> host port P: `<path>_P`).
    #[arg(long)]
    pub vsock: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = DEFAULT_GUEST_CID)]
    pub guest_cid: u64,
    /// A virtio-net NIC on host tap TAP, `TAP[,mac=02:xx:xx:xx:xx:xx][,mtu=N]` (repeatable;
    /// the guest sees eth0, eth1, ...). The tap is opened in podvisor's network namespace,
    /// and created if it does not exist (it then goes away with the VM); configure the
    /// host side (address, bridge, up) yourself. Default MAC: random, locally
    /// administered; default MTU: 1500 (keep the tap's MTU at most the NIC's).
    #[arg(long = "net", value_name = "TAP[,mac=..][,mtu=N]", value_parser = parse_net)]
    pub nets: Vec<NetConfig>,
    /// A virtio-balloon (the last device): the guest reports the memory it frees and the
    /// host releases it (see `--timings` for the VM's memory at the end).
    #[arg(long)]
    pub balloon: bool,
    /// Where the guest console goes: `stdio`, `none`, or a file path (appended).
    #[arg(long, default_value = "stdio")]
    pub console: String,
    /// Print boot timings and memory use to stderr when the VM stops.
    #[arg(long)]
    pub timings: bool,
    /// Write boot timings as JSON to this file when the VM stops.
    #[arg(long)]
    pub timings_json: Option<PathBuf>,
    /// Stop the VM after this many seconds (exit status 3).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Sample where the guest's vCPUs are this many times a second and print the most
    /// sampled guest-kernel functions when the VM stops: from the start to the guest's
    /// init (boot-timer marker), and after it. Functions are named from the `System.map`
    /// next to the kernel. 0: off.
    #[arg(long, value_name = "HZ", default_value_t = 0)]
    pub profile_hz: u32,
    /// Seccomp filters of the threads that handle guest data: enforce (a forbidden
    /// syscall ends the process with SIGSYS), log (allowed and recorded in the kernel's
    /// audit log: to find what a new code path needs) or off.
    #[arg(long, value_name = "MODE", default_value = "enforce")]
    pub seccomp: vmm::SeccompMode,
    /// Save the VM to this directory once the guest's init has started (boot-timer
    /// marker) and `--snapshot-after` seconds more have passed, then stop it (exit status
    /// 0). The directory gets `state` and a sparse `memory` file (docs/snapshot-format.md).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "restore",
        alias = "snapshot-at-marker"
    )]
    pub snapshot: Option<PathBuf>,
    /// Seconds between the guest's init start and `--snapshot`.
    #[arg(long, default_value_t = 0.0, value_name = "SECS")]
    pub snapshot_after: f64,
    /// Restore the VM saved in this directory instead of booting a kernel: the guest goes
    /// on where it was saved. --vcpus, --mem-mib, --kernel, --initrd and --cmdline are the
    /// snapshot's; --disk, --share, --vsock and --net, if given, replace the snapshot's
    /// files, socket and taps (same devices in the same order, same sizes, tags, guest CID,
    /// MACs and MTUs; without --net the snapshot's taps are reopened by name).
    #[arg(long, value_name = "DIR")]
    pub restore: Option<PathBuf>,
    /// With --restore: check the memory file's checksum first (reads all of it).
    #[arg(long, requires = "restore")]
    pub verify_memory: bool,
    #[command(flatten)]
    pub host: HostArgs,
}

fn console_config(spec: &str) -> ConsoleConfig {
    match spec {
        "stdio" => ConsoleConfig::Stdio,
        "none" => ConsoleConfig::Discard,
        path => ConsoleConfig::File(PathBuf::from(path)),
    }
}

impl BootArgs {
    /// The VM the arguments describe: shape and bindings.
    fn vm_config(&self) -> VmConfig {
        let mut vm = VmConfig {
            shape: GuestShape {
                kernel: self.kernel.clone().unwrap_or_default(),
                initrd: self.initrd.clone(),
                cmdline: self.cmdline.clone(),
                vcpus: self.vcpus,
                max_vcpus: self.max_vcpus.unwrap_or(0),
                mem_mib: self.mem_mib,
                balloon: self.balloon,
                ..GuestShape::default()
            },
            bindings: HostBindings {
                console: console_config(&self.console),
                host: self.host_settings(),
                ..HostBindings::default()
            },
        };
        self.disks.iter().for_each(|d| vm.add_disk(d.clone()));
        self.shares.iter().for_each(|s| vm.add_share(s.clone()));
        if let Some(path) = &self.vsock {
            vm.set_vsock(self.guest_cid, path.clone());
        }
        self.nets.iter().for_each(|n| vm.add_nic(n.clone()));
        vm
    }

    fn host_settings(&self) -> HostSettings {
        HostSettings {
            kvm_device: self.host.kvm_device.clone(),
            memory: MemoryKnobs {
                noreserve: self.host.noreserve,
                ksm: self.host.ksm,
            },
            quirks: self.host.host_quirks,
            seccomp: self.seccomp,
            profile_hz: self.profile_hz,
        }
    }

    /// `--restore`: the bindings of the device arguments; their shape is checked against
    /// the snapshot's once it is read ([`BootArgs::check_restored`]).
    fn restore_config(&self, dir: &Path) -> RestoreConfig {
        RestoreConfig {
            bindings: self.vm_config().bindings,
            verify_memory: self.verify_memory,
            ..RestoreConfig::new(dir)
        }
    }

    /// What the device arguments of a `--restore` say of the guest's shape must be the
    /// restored guest's (`restored`): disks' read-only flags, shares' tags and options, the
    /// vsock CID, and the NICs' MACs and MTUs where given.
    fn check_restored(&self, restored: &GuestShape) -> Result<(), SnapshotError> {
        let mut given = restored.clone();
        for (shape, disk) in given.disks.iter_mut().zip(&self.disks) {
            shape.read_only = disk.read_only;
        }
        for (shape, share) in given.shares.iter_mut().zip(&self.shares) {
            *shape = split_share(share.clone()).0;
        }
        if let (Some(shape), Some(_)) = (&mut given.vsock, &self.vsock) {
            shape.guest_cid = self.guest_cid;
        }
        for (shape, nic) in given.nics.iter_mut().zip(&self.nets) {
            shape.mac = nic.mac.or(shape.mac);
            shape.mtu = nic.mtu.or(shape.mtu);
        }
        SnapshotError::check_shape(restored, &given)
    }
}

/// Boots (or restores) the VM and returns the process exit status.
pub fn run(args: BootArgs, process_start: Instant) -> Result<u8, Box<dyn std::error::Error>> {
    let vm = match &args.restore {
        Some(dir) => {
            let vm = Vm::restore(&args.restore_config(dir), process_start)?;
            args.check_restored(vm.shape())?;
            vm
        }
        None => Vm::new(args.vm_config(), process_start)?,
    };
    let timeout = args.timeout.map(Duration::from_secs);
    let mut running = vm.start()?;
    if let Some(dir) = &args.snapshot {
        if running.wait_for_init(timeout).is_ok() {
            return snapshot_and_stop(running, dir, args.snapshot_after);
        }
    }
    let profile = running.profile();
    let mut profiles = Vec::new();
    if let Some(profile) = &profile {
        let _ = running.wait_for_init(timeout);
        profiles.push(("start to init", profile.take()));
    }
    let report = running.wait(timeout);
    if let Some(profile) = &profile {
        profiles.push(("after init", profile.take()));
        let system_map = args.kernel.as_ref().map(|k| k.with_file_name("System.map"));
        let symbols = system_map
            .as_deref()
            .and_then(|p| vmm::SymbolMap::load(p).ok())
            .unwrap_or_default();
        if symbols.is_empty() {
            eprintln!("podvisor: no System.map next to the kernel: functions stay unnamed");
        }
        for (what, samples) in &profiles {
            eprint!("{}", format_profile(what, samples, &symbols, 40));
        }
    }
    let _ = std::io::stdout().flush();
    let code = report.reason.exit_code();
    if code == 0 {
        log::info!("{}", report.reason);
    } else {
        eprintln!("podvisor: {}", report.reason);
        if !report.console_tail.is_empty() && args.console != "stdio" {
            eprintln!("podvisor: last console lines:\n{}", report.console_tail);
        }
    }
    if args.timings {
        eprint!("{}", format_timings(&report.timings));
    }
    if let Some(path) = &args.timings_json {
        let record =
            podvisor_bench::TimingsRecord::new(&report.timings, &report.reason.to_string(), code);
        std::fs::write(path, serde_json::to_string(&record)?)?;
    }
    // Exit codes are 0, 1 or 3 (`ExitReason::exit_code`).
    Ok(u8::try_from(code).unwrap_or(u8::MAX))
}

/// A guest profile as a table: the `top` most sampled functions with their share.
fn format_profile(
    what: &str,
    samples: &vmm::GuestSamples,
    symbols: &vmm::SymbolMap,
    top: usize,
) -> String {
    let total = samples.total();
    let mut out = format!("guest profile, {what}: {total} samples\n");
    for (function, n) in samples.by_function(symbols).into_iter().take(top) {
        out.push_str(&format!(
            "  {:>6} {:>5.1}%  {function}\n",
            n,
            n as f64 * 100.0 / total.max(1) as f64
        ));
    }
    out
}

/// `--snapshot`: waits `after` seconds, pauses, saves, stops. Exit status 0 once saved.
fn snapshot_and_stop(
    running: RunningVm,
    dir: &Path,
    after: f64,
) -> Result<u8, Box<dyn std::error::Error>> {
    std::thread::sleep(Duration::from_secs_f64(after.max(0.0)));
    let started = Instant::now();
    let saved = running.pause().and_then(|()| running.snapshot(dir));
    let took = started.elapsed();
    let report = running.stop("snapshot taken");
    let _ = std::io::stdout().flush();
    let info = saved.map_err(|e| format!("{e}; last console lines:\n{}", report.console_tail))?;
    eprintln!(
        "podvisor: snapshot saved to {} in {:.1} ms (pause included): state {} KiB, memory {} MiB, {:.1} MiB of it data",
        info.dir.display(),
        took.as_secs_f64() * 1e3,
        info.state_bytes.div_ceil(1024),
        info.memory_bytes >> 20,
        info.memory_data_bytes as f64 / f64::from(1 << 20)
    );
    Ok(0)
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("n/a".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Human-readable timings.
pub fn format_timings(t: &BootTimings) -> String {
    let mut out = String::new();
    out += &format!(
        "host setup (process start -> first KVM_RUN): {}\n",
        ms(t.host_setup)
    );
    out += &format!(
        "guest time to init (first KVM_RUN -> boot marker): {}\n",
        t.guest_to_init
            .map_or("n/a (no marker)".into(), |d| format!(
                "{:.2} s",
                d.as_secs_f64()
            ))
    );
    match t.memory_at_init {
        Some(m) => {
            out += &format!(
                "VMM RSS outside guest RAM at init: {} (PSS {})\n",
                mib(m.vmm_rss_kib),
                mib(m.vmm_pss_kib)
            );
            out += &format!("guest RAM touched at init: {}\n", mib(m.guest_rss_kib));
        }
        None => out += "memory at init: n/a (no marker)\n",
    }
    if let Some(m) = t.memory_at_stop {
        out += &format!(
            "at stop: VMM PSS {}, guest RAM resident {} (PSS {}): {} shared with a snapshot file, {} private\n",
            mib(m.vmm_pss_kib),
            mib(m.guest_rss_kib),
            mib(m.guest_pss_kib),
            mib(m.guest_shared_kib()),
            mib(m.guest_anon_kib)
        );
    }
    out += &format!("total run time: {:.2} s\n", t.total.as_secs_f64());
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        boot: BootArgs,
    }

    fn args(words: &[&str]) -> BootArgs {
        let argv = std::iter::once("podvisor").chain(words.iter().copied());
        Cli::try_parse_from(argv).unwrap().boot
    }

    #[test]
    fn arguments_split_into_shape_and_bindings() {
        let a = args(&[
            "--kernel",
            "/k",
            "--disk",
            "/d.img,ro",
            "--vsock",
            "/v.sock",
            "--guest-cid",
            "7",
            "--net",
            "tap0,mtu=9000",
            "--console",
            "none",
        ]);
        let vm = a.vm_config();
        assert_eq!(vm.shape.kernel, PathBuf::from("/k"));
        assert!(vm.shape.disks[0].read_only);
        assert_eq!(vm.shape.vsock.as_ref().map(|v| v.guest_cid), Some(7));
        assert_eq!(vm.shape.nics[0].mtu, Some(9000));
        assert_eq!(vm.bindings.disks, [PathBuf::from("/d.img")]);
        assert_eq!(vm.bindings.vsock, Some(PathBuf::from("/v.sock")));
        assert_eq!(vm.bindings.console, ConsoleConfig::Discard);
        assert_eq!(vm.bindings.host.seccomp, vmm::SeccompMode::Enforce);
    }

    #[test]
    fn a_restore_refuses_device_options_the_snapshot_contradicts() {
        let a = args(&["--restore", "/snap", "--disk", "/d.img,ro", "--net", "tap0"]);
        let booted = args(&[
            "--kernel",
            "/k",
            "--disk",
            "/d.img",
            "--net",
            "tap0,mtu=1400",
        ]);
        let saved = booted.vm_config().shape;
        let e = a.check_restored(&saved).unwrap_err().to_string();
        assert!(
            e.contains("disks[0].read_only is false in the snapshot"),
            "{e}"
        );
        let same = args(&["--restore", "/snap", "--disk", "/d.img", "--net", "tap1"]);
        same.check_restored(&saved).unwrap();
        let r = same.restore_config(Path::new("/snap"));
        assert_eq!(r.shape, None);
        assert_eq!(r.bindings.disks, [PathBuf::from("/d.img")]);
    }
}
