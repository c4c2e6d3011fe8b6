//! What a VM is made of: kernel, initrd, command line, vCPUs, memory, console.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use devices::virtio::block::BlockConfig;
pub use devices::virtio::fs::ShareConfig;
pub use devices::virtio::net::{NetConfig, NetState, TapSource};

use crate::arch::mptable;

/// Smallest guest memory podvisor accepts. A minimal kernel loads at 16 MiB and needs room
/// above it for itself and an initramfs.
pub const MIN_MEM_MIB: u64 = 32;
/// Largest guest memory podvisor accepts (a sanity bound, not a KVM limit).
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Largest vCPU count (the MP table's limit).
pub const MAX_VCPUS: usize = mptable::MAX_CPUS;

/// The command line used when none is given: serial console, reset through the i8042
/// (the VMM stops on it), reboot on panic so a panicked guest ends the VM, no PCI probing.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule";

/// Where the guest console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleConfig {
    /// The VMM's stdout; stdin is fed to the guest.
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Appended to a file bounded in size and rate (`crate::console_file`): the console
    /// of a guest that may be hostile.
    CappedFile(PathBuf, crate::console_file::ConsoleCap),
    /// Kept only in memory (the console tail in errors).
    Discard,
}

/// A VM's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmConfig {
    /// Guest kernel: ELF `vmlinux` (PVH entry used when present) or `bzImage`.
    pub kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed if the kernel supports it).
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends its own words (devices, host quirks).
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Console output.
    pub console: ConsoleConfig,
    /// virtio-blk disks, in the order the guest sees them (`/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<BlockConfig>,
    /// virtio-fs shares, one device per tag (`mount -t virtiofs TAG DIR` in the guest).
    pub shares: Vec<ShareConfig>,
    /// virtio-vsock with the hybrid Unix-socket back end, if any.
    pub vsock: Option<VsockConfig>,
    /// virtio-net NICs on host taps, in the order the guest sees them (`eth0`, `eth1`,
    /// ...). E.g. the shim: `NetConfig { tap: TapSource::from(tap_fd), mac: Some(mac),
    /// mtu: Some(mtu) }` with a tap it opened in the pod's network namespace.
    ///
    /// Not written to a snapshot's configuration (a tap fd means nothing in another
    /// process): a restored VM's NICs come from [`RestoreConfig::net`], or else from the
    /// tap names, MACs and MTUs in the snapshot's device state.
    #[serde(skip)]
    pub net: Vec<NetConfig>,
}

/// The guest CID podvisor gives a VM's vsock device (each VM has its own device, so the
/// CID only has to differ from the host's, 2).
pub const DEFAULT_GUEST_CID: u64 = 3;

/// virtio-vsock: the guest's CID and the VM's Unix socket (host → guest: connect to
/// `uds_path` and send `CONNECT <port>`; guest → host port P: `<uds_path>_P`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: 1,
            mem_mib: 128,
            console: ConsoleConfig::Stdio,
            disks: Vec::new(),
            shares: Vec::new(),
            vsock: None,
            net: Vec::new(),
        }
    }
}

/// A VM restored from a snapshot (see [`crate::snapshot`]): the snapshot, and this VM's
/// own console and host resources. Devices are bound to this VM's files and sockets; they
/// must be the snapshot's devices as the guest knows them (same number and order, same disk
/// sizes and read-only flags, share tags and guest CID).
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// The snapshot directory (`state` and `memory`).
    pub snapshot: PathBuf,
    pub console: ConsoleConfig,
    /// This VM's disks; `None`: the snapshot's own files.
    pub disks: Option<Vec<BlockConfig>>,
    /// This VM's shares; `None`: the snapshot's own directories.
    pub shares: Option<Vec<ShareConfig>>,
    /// This VM's vsock socket (same guest CID as saved); `None`: the snapshot's own path.
    pub vsock: Option<VsockConfig>,
    /// This VM's NICs (same number and order, same MACs and MTUs as saved; a `None` MAC or
    /// MTU takes the saved one); `None`: the snapshot's taps, reopened by name in this
    /// process's network namespace.
    pub net: Option<Vec<NetConfig>>,
    /// Check the memory file's CRC first (reads the whole file: for debugging, or once after
    /// copying a snapshot).
    pub verify_memory: bool,
    /// Move the guest's kvm-clock forward by the wall time since the snapshot (KVM's
    /// `KVM_CLOCK_REALTIME`, where the host supports it) instead of letting it continue
    /// from the saved value. Either way the guest's wall clock must be set through the
    /// guest after a restore.
    pub advance_clock: bool,
}

impl RestoreConfig {
    /// A restore of `snapshot` with the snapshot's own host resources, console discarded.
    pub fn new(snapshot: impl Into<PathBuf>) -> Self {
        Self {
            snapshot: snapshot.into(),
            console: ConsoleConfig::Discard,
            disks: None,
            shares: None,
            vsock: None,
            net: None,
            verify_memory: false,
            advance_clock: false,
        }
    }

    /// The restored VM's configuration: the snapshot's `saved` one with this VM's console
    /// and host resources. A snapshot's state file is data, not a list of host objects to
    /// reopen: every disk, share, vsock socket and NIC the snapshot has must be bound here
    /// ([`ConfigError::Unbound`] otherwise).
    pub fn apply(&self, saved: &VmConfig) -> Result<VmConfig, ConfigError> {
        fn bound<T: Clone>(
            given: &Option<Vec<T>>,
            saved: usize,
            what: &'static str,
        ) -> Result<Vec<T>, ConfigError> {
            match given {
                Some(v) => Ok(v.clone()),
                None if saved == 0 => Ok(Vec::new()),
                None => Err(ConfigError::Unbound { what, saved }),
            }
        }
        let disks = bound(&self.disks, saved.disks.len(), "disk")?;
        let shares = bound(&self.shares, saved.shares.len(), "share")?;
        let vsock = match (&self.vsock, &saved.vsock) {
            (Some(v), _) => Some(v.clone()),
            (None, None) => None,
            (None, Some(_)) => {
                return Err(ConfigError::Unbound {
                    what: "vsock socket",
                    saved: 1,
                })
            }
        };
        Ok(VmConfig {
            console: self.console.clone(),
            disks,
            shares,
            vsock,
            ..saved.clone()
        })
    }

    /// The restored VM's NICs, given the snapshot's saved ones (in order): [`Self::net`]
    /// with missing MACs and MTUs taken from the saved devices; a snapshot with NICs needs
    /// [`Self::net`] (its taps are never reopened by the saved names).
    pub fn net_configs(&self, saved: &[NetState]) -> Result<Vec<NetConfig>, ConfigError> {
        match &self.net {
            Some(nics) => Ok(nics
                .iter()
                .enumerate()
                .map(|(i, nic)| NetConfig {
                    tap: nic.tap.clone(),
                    mac: nic.mac.or(saved.get(i).map(|s| s.mac)),
                    mtu: nic.mtu.or(saved.get(i).map(|s| s.mtu)),
                })
                .collect()),
            None if saved.is_empty() => Ok(Vec::new()),
            None => Err(ConfigError::Unbound {
                what: "NIC",
                saved: saved.len(),
            }),
        }
    }
}

/// Errors in a VM configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "the snapshot has {saved} {what}(s) and the restore binds none: give each one's host \
         side (`--disk`, `--share`, `--vsock`, `--net` with `podvisor boot --restore`); a \
         snapshot's host paths are never reopened"
    )]
    Unbound { what: &'static str, saved: usize },
    #[error("vCPU count must be 1 to {MAX_VCPUS}, not {0}")]
    Vcpus(usize),
    #[error("guest memory must be {MIN_MEM_MIB} to {MAX_MEM_MIB} MiB, not {0} MiB")]
    Memory(u64),
    #[error("kernel image {0} not found: pass --kernel, or build one with `make guest-kernel`")]
    KernelMissing(PathBuf),
    #[error("initrd {0} not found: pass --initrd, or build one with `make rootfs`")]
    InitrdMissing(PathBuf),
    #[error("disk image {0} not found: create it first (e.g. `truncate -s 64M disk.img`)")]
    DiskMissing(PathBuf),
    #[error("invalid disk {spec:?}: expected PATH[,ro]")]
    DiskSpec { spec: String },
    #[error("virtio-fs share: {0}")]
    Share(#[from] devices::virtio::fs::ConfigError),
    #[error("invalid NIC {spec:?}: {reason}; expected TAP[,mac=02:xx:xx:xx:xx:xx][,mtu=N]")]
    NetSpec { spec: String, reason: String },
}

/// Parses a disk given as `PATH[,ro]`.
pub fn parse_disk(spec: &str) -> Result<BlockConfig, ConfigError> {
    let err = || ConfigError::DiskSpec {
        spec: spec.to_string(),
    };
    let mut parts = spec.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(err)?;
    let mut read_only = false;
    for opt in parts {
        match opt {
            "ro" => read_only = true,
            "rw" => read_only = false,
            _ => return Err(err()),
        }
    }
    Ok(BlockConfig {
        path: PathBuf::from(path),
        read_only,
        id: None,
    })
}

/// Parses a NIC given as `TAP[,mac=AA:BB:CC:DD:EE:FF][,mtu=N]` (a tap by name, opened or
/// created in the caller's network namespace).
pub fn parse_net(spec: &str) -> Result<NetConfig, ConfigError> {
    let err = |reason: &str| ConfigError::NetSpec {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let mut parts = spec.split(',');
    let tap = parts
        .next()
        .filter(|t| !t.is_empty() && !t.contains('='))
        .ok_or_else(|| err("the tap name comes first"))?;
    let mut nic = NetConfig::named(tap);
    for opt in parts {
        match opt.split_once('=') {
            Some(("mac", v)) => {
                let mac = devices::virtio::net::parse_mac(v).ok_or_else(|| err("bad MAC"))?;
                if mac[0] & 1 != 0 {
                    return Err(err("the MAC is a multicast address"));
                }
                nic.mac = Some(mac);
            }
            Some(("mtu", v)) => {
                let mtu = v.parse::<u16>().map_err(|_| err("bad MTU"))?;
                let (min, max) = (devices::virtio::net::MIN_MTU, devices::virtio::net::MAX_MTU);
                if !(min..=max).contains(&mtu) {
                    return Err(err(&format!("the MTU must be {min} to {max}")));
                }
                nic.mtu = Some(mtu);
            }
            _ => return Err(err(&format!("unknown option {opt:?}"))),
        }
    }
    Ok(nic)
}

impl VmConfig {
    /// Checks the configuration before anything is created.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::Memory(self.mem_mib));
        }
        if !self.kernel.is_file() {
            return Err(ConfigError::KernelMissing(self.kernel.clone()));
        }
        if let Some(initrd) = &self.initrd {
            if !initrd.is_file() {
                return Err(ConfigError::InitrdMissing(initrd.clone()));
            }
        }
        self.validate_devices()
    }

    /// Checks the devices' host resources (also for a restored VM, which has no kernel).
    pub fn validate_devices(&self) -> Result<(), ConfigError> {
        if let Some(disk) = self.disks.iter().find(|d| !d.path.exists()) {
            return Err(ConfigError::DiskMissing(disk.path.clone()));
        }
        ShareConfig::check_unique_tags(&self.shares)?;
        Ok(())
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: std::env::current_exe().unwrap(), // any existing file
            ..Default::default()
        }
    }

    #[test]
    fn parses_disk_specs() {
        let d = parse_disk("/var/a.img,ro").unwrap();
        assert_eq!((d.path, d.read_only), (PathBuf::from("/var/a.img"), true));
        assert!(!parse_disk("b.img").unwrap().read_only);
        assert!(parse_disk("").is_err());
        assert!(parse_disk("a.img,bogus").is_err());
    }

    #[test]
    fn parses_net_specs() {
        let n = parse_net("tap0,mac=02:00:00:00:00:07,mtu=9000").unwrap();
        assert!(matches!(&n.tap, TapSource::Name(t) if t == "tap0"));
        assert_eq!((n.mac, n.mtu), (Some([2, 0, 0, 0, 0, 7]), Some(9000)));
        let n = parse_net("tap1").unwrap();
        assert_eq!((n.mac, n.mtu), (None, None));
        for bad in [
            "",
            "mac=02:00:00:00:00:07",
            "tap0,mac=01:00:00:00:00:07",
            "tap0,mac=zz",
            "tap0,mtu=10",
            "tap0,mtu=big",
            "tap0,speed=10",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn restored_nics_come_from_the_override_never_the_snapshots_taps() {
        let saved = vec![NetState {
            tap: "tap9".into(),
            mac: [2, 0, 0, 0, 0, 9],
            mtu: 1400,
            avail_features: 0,
            acked_features: 0,
            queues: None,
        }];
        let r = RestoreConfig::new("/snap");
        assert_eq!(
            r.net_configs(&saved).unwrap_err(),
            ConfigError::Unbound {
                what: "NIC",
                saved: 1
            }
        );
        assert!(r.net_configs(&[]).unwrap().is_empty());
        let r = RestoreConfig {
            net: Some(vec![NetConfig::named("tapX")]),
            ..RestoreConfig::new("/snap")
        };
        let nics = r.net_configs(&saved).unwrap();
        assert!(matches!(&nics[0].tap, TapSource::Name(t) if t == "tapX"));
        assert_eq!(
            (nics[0].mac, nics[0].mtu),
            (Some([2, 0, 0, 0, 0, 9]), Some(1400))
        );
    }

    #[test]
    fn a_restore_binds_every_host_resource_itself() {
        let mut saved = config();
        saved.disks = vec![parse_disk("/saved/disk.img").unwrap()];
        saved.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: "/saved/v.sock".into(),
        });
        let r = RestoreConfig::new("/snap");
        assert!(matches!(
            r.apply(&saved),
            Err(ConfigError::Unbound { what: "disk", .. })
        ));
        let r = RestoreConfig {
            disks: Some(vec![parse_disk("/mine/disk.img").unwrap()]),
            ..RestoreConfig::new("/snap")
        };
        assert!(matches!(
            r.apply(&saved),
            Err(ConfigError::Unbound {
                what: "vsock socket",
                ..
            })
        ));
        let r = RestoreConfig {
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: "/mine/v.sock".into(),
            }),
            ..r
        };
        let c = r.apply(&saved).unwrap();
        assert_eq!(c.disks[0].path, PathBuf::from("/mine/disk.img"));
        assert_eq!(c.vsock.unwrap().uds_path, PathBuf::from("/mine/v.sock"));
    }

    #[test]
    fn accepts_defaults() {
        assert_eq!(config().validate(), Ok(()));
        assert_eq!(config().mem_bytes(), 128 << 20);
    }

    #[test]
    fn rejects_bad_sizes_and_paths() {
        let c = VmConfig {
            vcpus: 0,
            ..config()
        };
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        let c = VmConfig {
            vcpus: MAX_VCPUS + 1,
            ..config()
        };
        assert!(c.validate().is_err());
        let c = VmConfig {
            mem_mib: 16,
            ..config()
        };
        assert_eq!(c.validate(), Err(ConfigError::Memory(16)));
        let c = VmConfig {
            kernel: "/nonexistent/vmlinux".into(),
            ..config()
        };
        assert!(matches!(c.validate(), Err(ConfigError::KernelMissing(_))));
        let c = VmConfig {
            initrd: Some("/nonexistent/initrd".into()),
            ..config()
        };
        assert!(matches!(c.validate(), Err(ConfigError::InitrdMissing(_))));
        let msg = VmConfig {
            kernel: "/x".into(),
            ..config()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(msg.contains("make guest-kernel"), "{msg}");
    }
}
