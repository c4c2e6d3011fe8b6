//! What a VM is made of, in two halves:
//!
//! * [`GuestShape`]: everything the guest sees — kernel and initrd, command line, vCPUs,
//!   memory, and which devices exist with their guest-visible identity (disk read-only
//!   flags and IDs, share tags and options, the vsock CID, NIC MACs and MTUs). A snapshot
//!   saves the shape, a restore compares it ([`GuestShape::check_same`]), and the shim's
//!   template key is derived from it: one definition of what shapes a guest.
//! * [`HostBindings`]: how this process backs that guest — the console, the host side of
//!   each device (disk files, share directories and caps, the vsock socket, taps), and
//!   process-wide settings ([`HostSettings`]: the KVM device, guest RAM mapping knobs, host
//!   quirks, seccomp). Nothing here is visible to the guest; a restored VM always brings
//!   its own.
//!
//! The VMM reads no environment: the shim and the CLI turn theirs into these values.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use devices::virtio::block::BlockConfig;
pub use devices::virtio::fs::limits::FsLimits;
pub use devices::virtio::fs::{CachePolicy, ShareConfig, ShareOptions};
pub use devices::virtio::net::{parse_mac, NetConfig, NetState, TapSource, MAX_MTU, MIN_MTU};

use crate::arch::mptable;
pub use crate::console_file::ConsoleCap;
pub use crate::host::HostQuirks;
pub use crate::memory::MemoryKnobs;
pub use crate::seccomp::Mode as SeccompMode;

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

/// The guest CID podvisor gives a VM's vsock device (each VM has its own device, so the
/// CID only has to differ from the host's, 2).
pub const DEFAULT_GUEST_CID: u64 = 3;

/// The KVM device opened when none is configured.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

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
    CappedFile(PathBuf, ConsoleCap),
    /// Kept only in memory (the console tail in errors).
    Discard,
}

/// Everything the guest sees. Two VMs of one shape are interchangeable to the guest:
/// a snapshot of one restores as the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestShape {
    /// Guest kernel: ELF `vmlinux` (PVH entry used when present) or `bzImage`.
    pub kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed if the kernel supports it).
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends its own words (devices, host quirks).
    pub cmdline: String,
    /// Number of vCPUs online at boot.
    pub vcpus: usize,
    /// vCPUs the guest can have online (0: `vcpus`). Those beyond `vcpus` exist from the
    /// start (MP table entries, vCPU threads) but stay parked, waiting for the guest's
    /// INIT/SIPI, until the guest brings them online (`maxcpus=` on the kernel command line
    /// keeps the kernel from starting them at boot; writing 1 to
    /// `/sys/devices/system/cpu/cpuN/online` starts one). How a running VM's CPUs resize.
    #[serde(default)]
    pub max_vcpus: usize,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// virtio-blk disks, in the order the guest sees them (`/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<DiskShape>,
    /// virtio-fs shares, one device per tag (`mount -t virtiofs TAG DIR` in the guest).
    pub shares: Vec<ShareShape>,
    /// virtio-vsock, if any.
    pub vsock: Option<VsockShape>,
    /// virtio-net NICs, in the order the guest sees them (`eth0`, `eth1`, ...).
    pub nics: Vec<NicShape>,
    /// A virtio-balloon (after every other device): the host can take memory back from the
    /// running guest ([`RunningVm::balloon`](crate::RunningVm::balloon)) and the guest
    /// reports the memory it frees, which the host then releases.
    #[serde(default)]
    pub balloon: bool,
}

/// A disk as the guest sees it (its size is the bound file's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskShape {
    pub read_only: bool,
    /// Device ID seen by the guest (≤ 20 bytes); derived from the bound file if `None`.
    pub id: Option<String>,
}

/// A virtio-fs share as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareShape {
    pub tag: String,
    /// Every change refused with `EROFS`.
    pub read_only: bool,
    pub cache: CachePolicy,
    /// Extended attributes passed through.
    pub xattr: bool,
    /// FUSE writeback cache.
    pub writeback: bool,
    /// Device nodes may be created.
    pub allow_devices: bool,
}

/// virtio-vsock as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockShape {
    pub guest_cid: u64,
}

/// A NIC as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicShape {
    /// The MAC in config space; `None`: a random locally administered one at boot (a
    /// restore keeps the saved device's).
    pub mac: Option<[u8; 6]>,
    /// The MTU offered to the guest; `None`: 1500 at boot (a restore keeps the saved one).
    pub mtu: Option<u16>,
}

impl Default for GuestShape {
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: 1,
            max_vcpus: 0,
            mem_mib: 128,
            disks: Vec::new(),
            shares: Vec::new(),
            vsock: None,
            nics: Vec::new(),
            balloon: false,
        }
    }
}

/// How this process backs a guest: nothing of it is visible to the guest, and nothing of
/// it is saved in a snapshot.
#[derive(Debug, Clone)]
pub struct HostBindings {
    /// Console output.
    pub console: ConsoleConfig,
    /// One disk image or block device per [`GuestShape::disks`] entry, in order.
    pub disks: Vec<PathBuf>,
    /// One host directory per [`GuestShape::shares`] entry, in order.
    pub shares: Vec<ShareBinding>,
    /// The vsock device's Unix socket (host → guest: connect and send `CONNECT <port>`;
    /// guest → host port P: `<path>_P`), if [`GuestShape::vsock`] is set.
    pub vsock: Option<PathBuf>,
    /// One tap per [`GuestShape::nics`] entry, in order: a name opened (or created) in this
    /// process's network namespace, or a tap fd opened elsewhere (e.g. by the shim in the
    /// pod's network namespace).
    pub taps: Vec<TapSource>,
    /// This process's settings.
    pub host: HostSettings,
}

/// A share's host side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareBinding {
    /// The host directory (absolute).
    pub dir: PathBuf,
    /// How many inodes and handles the guest may hold on the host at once.
    pub limits: FsLimits,
}

/// Process-wide host settings of the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSettings {
    /// The KVM device node (another one lets tests simulate a host without KVM).
    pub kvm_device: PathBuf,
    /// How guest RAM is mapped.
    pub memory: MemoryKnobs,
    /// Host quirks: detected, or forced.
    pub quirks: HostQuirks,
    /// Seccomp filters of the threads that handle guest data (one mode per process: the
    /// first VM's wins).
    pub seccomp: SeccompMode,
    /// Guest samples per second per vCPU for a profile of where the guest runs (0: off,
    /// the default; see [`crate::GuestProfileHandle`]).
    pub profile_hz: u32,
}

impl Default for HostSettings {
    fn default() -> Self {
        Self {
            kvm_device: PathBuf::from(DEFAULT_KVM_DEVICE),
            memory: MemoryKnobs::default(),
            quirks: HostQuirks::Auto,
            seccomp: SeccompMode::default(),
            profile_hz: 0,
        }
    }
}

impl Default for HostBindings {
    fn default() -> Self {
        Self {
            console: ConsoleConfig::Stdio,
            disks: Vec::new(),
            shares: Vec::new(),
            vsock: None,
            taps: Vec::new(),
            host: HostSettings::default(),
        }
    }
}

/// A VM to boot: its shape and this process's bindings for it.
#[derive(Debug, Clone, Default)]
pub struct VmConfig {
    pub shape: GuestShape,
    pub bindings: HostBindings,
}

impl VmConfig {
    /// Adds a disk: its read-only flag and ID to the shape, its file to the bindings.
    pub fn add_disk(&mut self, disk: BlockConfig) {
        self.shape.disks.push(DiskShape {
            read_only: disk.read_only,
            id: disk.id,
        });
        self.bindings.disks.push(disk.path);
    }

    /// Adds a share: its tag and options to the shape, its directory and caps to the
    /// bindings.
    pub fn add_share(&mut self, share: ShareConfig) {
        let (shape, binding) = split_share(share);
        self.shape.shares.push(shape);
        self.bindings.shares.push(binding);
    }

    /// Sets the vsock device: its CID to the shape, its socket to the bindings.
    pub fn set_vsock(&mut self, guest_cid: u64, uds_path: PathBuf) {
        self.shape.vsock = Some(VsockShape { guest_cid });
        self.bindings.vsock = Some(uds_path);
    }

    /// Adds a NIC: its MAC and MTU to the shape, its tap to the bindings.
    pub fn add_nic(&mut self, nic: NetConfig) {
        self.shape.nics.push(NicShape {
            mac: nic.mac,
            mtu: nic.mtu,
        });
        self.bindings.taps.push(nic.tap);
    }

    /// Checks the configuration before anything is created.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let shape = &self.shape;
        if shape.vcpus == 0 || shape.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(shape.vcpus));
        }
        if shape.max_vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(shape.max_vcpus));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&shape.mem_mib) {
            return Err(ConfigError::Memory(shape.mem_mib));
        }
        if !shape.kernel.is_file() {
            return Err(ConfigError::KernelMissing(shape.kernel.clone()));
        }
        if let Some(initrd) = &shape.initrd {
            if !initrd.is_file() {
                return Err(ConfigError::InitrdMissing(initrd.clone()));
            }
        }
        self.validate_devices()
    }

    /// Checks the devices: one binding per device, existing disks, unique share tags
    /// (also for a restored VM, which has no kernel).
    pub fn validate_devices(&self) -> Result<(), ConfigError> {
        let b = &self.bindings;
        for (what, shape, bound) in device_counts(&self.shape, b) {
            if shape != bound {
                return Err(ConfigError::BindingCount { what, shape, bound });
            }
        }
        if let Some(disk) = b.disks.iter().find(|d| !d.exists()) {
            return Err(ConfigError::DiskMissing(disk.clone()));
        }
        ShareConfig::check_unique_tags(&self.share_configs())?;
        Ok(())
    }

    /// The disks as the block device takes them.
    pub fn disk_configs(&self) -> Vec<BlockConfig> {
        self.shape
            .disks
            .iter()
            .zip(&self.bindings.disks)
            .map(|(d, path)| BlockConfig {
                path: path.clone(),
                read_only: d.read_only,
                id: d.id.clone(),
            })
            .collect()
    }

    /// The shares as the virtio-fs device takes them.
    pub fn share_configs(&self) -> Vec<ShareConfig> {
        self.shape
            .shares
            .iter()
            .zip(&self.bindings.shares)
            .map(|(s, b)| ShareConfig {
                tag: s.tag.clone(),
                dir: b.dir.clone(),
                options: ShareOptions {
                    read_only: s.read_only,
                    cache: s.cache,
                    xattr: s.xattr,
                    writeback: s.writeback,
                    allow_devices: s.allow_devices,
                    limits: b.limits,
                },
            })
            .collect()
    }

    /// The NICs as the net device takes them.
    pub fn nic_configs(&self) -> Vec<NetConfig> {
        self.shape
            .nics
            .iter()
            .zip(&self.bindings.taps)
            .map(|(nic, tap)| NetConfig {
                tap: tap.clone(),
                mac: nic.mac,
                mtu: nic.mtu,
            })
            .collect()
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.shape.mem_mib << 20
    }
}

/// Per device kind: its name, how many the shape has, how many the bindings bind.
fn device_counts(s: &GuestShape, b: &HostBindings) -> [(&'static str, usize, usize); 4] {
    [
        ("disk", s.disks.len(), b.disks.len()),
        ("share", s.shares.len(), b.shares.len()),
        ("vsock socket", s.vsock.iter().len(), b.vsock.iter().len()),
        ("NIC", s.nics.len(), b.taps.len()),
    ]
}

/// A share's guest-visible half and host half.
pub fn split_share(share: ShareConfig) -> (ShareShape, ShareBinding) {
    let o = share.options;
    (
        ShareShape {
            tag: share.tag,
            read_only: o.read_only,
            cache: o.cache,
            xattr: o.xattr,
            writeback: o.writeback,
            allow_devices: o.allow_devices,
        },
        ShareBinding {
            dir: share.dir,
            limits: o.limits,
        },
    )
}

impl GuestShape {
    /// The vCPUs the VM has (online at boot or parked): what the MP table lists and how
    /// many vCPU threads run.
    pub fn vcpu_slots(&self) -> usize {
        self.vcpus.max(self.max_vcpus)
    }

    /// `Ok` if `other` is this shape; else the first field that differs, by its path in
    /// the shape (`vcpus`, `disks[0].read_only`, `nics`, ...) with both values.
    pub fn check_same(&self, other: &GuestShape) -> Result<(), ShapeMismatch> {
        let (a, b) = (shape_value(self), shape_value(other));
        match first_difference(&a, &b, String::new()) {
            None => Ok(()),
            Some((field, ours, theirs)) => Err(ShapeMismatch {
                field,
                ours,
                theirs,
            }),
        }
    }
}

fn shape_value(shape: &GuestShape) -> serde_json::Value {
    // A struct of plain fields always serialises.
    serde_json::to_value(shape).unwrap_or_default()
}

/// The path of the first leaf where `a` and `b` differ, and both values there.
fn first_difference(
    a: &serde_json::Value,
    b: &serde_json::Value,
    path: String,
) -> Option<(String, String, String)> {
    use serde_json::Value;
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x
            .iter()
            .find_map(|(k, v)| first_difference(v, y.get(k).unwrap_or(&Value::Null), join(k))),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{path}[{i}]"))),
        (x, y) if x == y => None,
        (x, y) => Some((
            if path.is_empty() {
                "(shape)".into()
            } else {
                path
            },
            x.to_string(),
            y.to_string(),
        )),
    }
}

/// Two shapes differ: the field (its path in [`GuestShape`]) and both values (JSON).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} is {ours} in one shape and {theirs} in the other")]
pub struct ShapeMismatch {
    pub field: String,
    /// The value in the shape `check_same` was called on.
    pub ours: String,
    /// The value in the other shape.
    pub theirs: String,
}

/// A VM restored from a snapshot (see [`crate::snapshot`]): the snapshot, the shape the
/// caller expects of it, and this VM's host bindings. The snapshot's shape is the restored
/// VM's; its host paths are never reopened, so every device it has needs a binding here.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// The snapshot directory (`state` and `memory`).
    pub snapshot: PathBuf,
    /// The shape the restored VM must have ([`crate::SnapshotError::ShapeMismatch`]
    /// otherwise); `None`: the snapshot's, whatever it is.
    pub shape: Option<GuestShape>,
    /// This VM's console, device bindings (one per device of the snapshot's shape, in
    /// order) and host settings.
    pub bindings: HostBindings,
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
    /// A restore of `snapshot` with no device bindings, default host settings and the
    /// console discarded.
    pub fn new(snapshot: impl Into<PathBuf>) -> Self {
        Self {
            snapshot: snapshot.into(),
            shape: None,
            bindings: HostBindings {
                console: ConsoleConfig::Discard,
                ..HostBindings::default()
            },
            verify_memory: false,
            advance_clock: false,
        }
    }

    /// The restored VM's configuration: the snapshot's `saved` shape with this restore's
    /// bindings, and the MACs and MTUs the shape left open (the boot chose them) those of
    /// the `saved_nics` devices, in order. A device kind the snapshot has and the restore
    /// binds none of is [`ConfigError::Unbound`]; other counts that do not match are found
    /// by [`VmConfig::validate_devices`].
    pub fn apply(
        &self,
        saved: &GuestShape,
        saved_nics: &[NetState],
    ) -> Result<VmConfig, ConfigError> {
        for (what, saved, bound) in device_counts(saved, &self.bindings) {
            if saved > 0 && bound == 0 {
                return Err(ConfigError::Unbound { what, saved });
            }
        }
        let mut shape = saved.clone();
        for (nic, saved) in shape.nics.iter_mut().zip(saved_nics) {
            nic.mac = nic.mac.or(Some(saved.mac));
            nic.mtu = nic.mtu.or(Some(saved.mtu));
        }
        Ok(VmConfig {
            shape,
            bindings: self.bindings.clone(),
        })
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
    #[error(
        "the guest has {shape} {what}(s) and the host bindings give {bound}: bind each device \
         once, in the guest's order"
    )]
    BindingCount {
        what: &'static str,
        shape: usize,
        bound: usize,
    },
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
    #[error("virtio-fs share: {0}")]
    Share(#[from] devices::virtio::fs::ConfigError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            shape: GuestShape {
                kernel: std::env::current_exe().unwrap(), // any existing file
                ..Default::default()
            },
            bindings: HostBindings::default(),
        }
    }

    fn disk(path: &str) -> BlockConfig {
        BlockConfig {
            path: path.into(),
            read_only: false,
            id: None,
        }
    }

    #[test]
    fn restored_nics_take_what_the_shape_left_open_from_the_saved_device() {
        let saved = vec![NetState {
            tap: "tap9".into(),
            mac: [2, 0, 0, 0, 0, 9],
            mtu: 1400,
            avail_features: 0,
            acked_features: 0,
            queues: None,
        }];
        let mut booted = config();
        booted.add_nic(NetConfig::named("tap9"));
        assert_eq!(booted.nic_configs()[0].mac, None, "a boot picks its own");
        let mut r = RestoreConfig::new("/snap");
        r.bindings.taps = vec![TapSource::Name("tapX".into())];
        let nics = r.apply(&booted.shape, &saved).unwrap().nic_configs();
        assert!(matches!(&nics[0].tap, TapSource::Name(t) if t == "tapX"));
        assert_eq!(
            (nics[0].mac, nics[0].mtu),
            (Some([2, 0, 0, 0, 0, 9]), Some(1400))
        );
    }

    #[test]
    fn a_restore_binds_every_host_resource_itself() {
        let mut saved = config();
        saved.add_disk(disk("/saved/disk.img"));
        saved.set_vsock(3, "/saved/v.sock".into());
        saved.add_nic(NetConfig::named("tap9"));
        let saved = saved.shape;
        let r = RestoreConfig::new("/snap");
        assert!(matches!(
            r.apply(&saved, &[]),
            Err(ConfigError::Unbound { what: "disk", .. })
        ));
        let mut r = RestoreConfig::new("/snap");
        r.bindings.disks = vec!["/mine/disk.img".into()];
        assert!(matches!(
            r.apply(&saved, &[]),
            Err(ConfigError::Unbound {
                what: "vsock socket",
                ..
            })
        ));
        r.bindings.vsock = Some("/mine/v.sock".into());
        assert_eq!(
            r.apply(&saved, &[]).unwrap_err(),
            ConfigError::Unbound {
                what: "NIC",
                saved: 1
            }
        );
        r.bindings.taps = vec![TapSource::Name("tapX".into())];
        let c = r.apply(&saved, &[]).unwrap();
        assert_eq!(c.shape, saved);
        assert_eq!(c.disk_configs()[0].path, PathBuf::from("/mine/disk.img"));
        assert_eq!(c.bindings.vsock, Some(PathBuf::from("/mine/v.sock")));
        r.bindings.disks.push("/mine/other.img".into());
        assert_eq!(
            r.apply(&saved, &[]).unwrap().validate_devices(),
            Err(ConfigError::BindingCount {
                what: "disk",
                shape: 1,
                bound: 2
            })
        );
    }

    #[test]
    fn devices_split_into_shape_and_bindings_and_back() {
        let dir = std::env::temp_dir();
        let share = ShareConfig::new(
            "tag0",
            &dir,
            ShareOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut c = config();
        c.add_share(share.clone());
        c.add_disk(BlockConfig {
            read_only: true,
            id: Some("id0".into()),
            ..disk("/d.img")
        });
        assert_eq!(c.share_configs(), vec![share]);
        assert_eq!(c.shape.shares[0].tag, "tag0");
        assert_eq!(c.bindings.shares[0].dir, dir.canonicalize().unwrap());
        let d = &c.disk_configs()[0];
        assert_eq!(
            (d.path.to_str(), d.read_only, d.id.as_deref()),
            (Some("/d.img"), true, Some("id0"))
        );
    }

    #[test]
    fn shapes_are_compared_field_by_field() {
        let a = config().shape;
        assert_eq!(a.check_same(&a.clone()), Ok(()));
        let more = GuestShape {
            vcpus: 2,
            ..a.clone()
        };
        let e = a.check_same(&more).unwrap_err();
        assert_eq!((e.field.as_str(), e.ours.as_str()), ("vcpus", "1"));
        let mut ro = config();
        ro.add_disk(disk("/a"));
        let mut rw = ro.clone();
        rw.shape.disks[0].read_only = true;
        let e = ro.shape.check_same(&rw.shape).unwrap_err();
        assert_eq!(e.field, "disks[0].read_only", "{e}");
        let e = a.check_same(&ro.shape).unwrap_err();
        assert_eq!(e.field, "disks", "{e}");
    }

    #[test]
    fn accepts_defaults() {
        assert_eq!(config().validate(), Ok(()));
        assert_eq!(config().mem_bytes(), 128 << 20);
    }

    #[test]
    fn parked_vcpus_count_as_slots_and_fewer_than_online_mean_none() {
        let shape = |vcpus, max_vcpus| GuestShape {
            vcpus,
            max_vcpus,
            ..GuestShape::default()
        };
        assert_eq!(shape(2, 0).vcpu_slots(), 2);
        assert_eq!(shape(2, 1).vcpu_slots(), 2);
        assert_eq!(shape(2, 8).vcpu_slots(), 8);
        // A shape saved before parked vCPUs existed reads as none.
        let mut v = serde_json::to_value(shape(2, 8)).unwrap();
        v.as_object_mut().unwrap().remove("max_vcpus");
        v.as_object_mut().unwrap().remove("balloon");
        let old: GuestShape = serde_json::from_value(v).unwrap();
        assert_eq!((old.vcpu_slots(), old.balloon), (2, false));
    }

    #[test]
    fn rejects_bad_sizes_and_paths() {
        let with = |f: &dyn Fn(&mut GuestShape)| {
            let mut c = config();
            f(&mut c.shape);
            c.validate()
        };
        assert_eq!(with(&|s| s.vcpus = 0), Err(ConfigError::Vcpus(0)));
        assert!(with(&|s| s.vcpus = MAX_VCPUS + 1).is_err());
        assert_eq!(
            with(&|s| s.max_vcpus = MAX_VCPUS + 1),
            Err(ConfigError::Vcpus(MAX_VCPUS + 1))
        );
        assert_eq!(with(&|s| s.max_vcpus = MAX_VCPUS), Ok(()));
        assert_eq!(with(&|s| s.mem_mib = 16), Err(ConfigError::Memory(16)));
        assert!(matches!(
            with(&|s| s.kernel = "/nonexistent/vmlinux".into()),
            Err(ConfigError::KernelMissing(_))
        ));
        assert!(matches!(
            with(&|s| s.initrd = Some("/nonexistent/initrd".into())),
            Err(ConfigError::InitrdMissing(_))
        ));
        let msg = with(&|s| s.kernel = "/x".into()).unwrap_err().to_string();
        assert!(msg.contains("make guest-kernel"), "{msg}");
        let mut c = config();
        c.shape.disks.push(DiskShape {
            read_only: false,
            id: None,
        });
        assert_eq!(
            c.validate(),
            Err(ConfigError::BindingCount {
                what: "disk",
                shape: 1,
                bound: 0
            })
        );
    }
}
