//! Snapshots of a paused VM, and the files they live in.
//!
//! A snapshot is a directory of two files (format in `docs/snapshot-format.md`):
//!
//! * `state`: a 24-byte header — magic `PODVSNAP`, format version (u32 LE), CRC-32 of the
//!   payload (u32 LE), payload length (u64 LE) — then the payload, a JSON
//!   [`SnapshotState`]: the host it was taken on, the guest's shape, the memory file's
//!   layout and CRC, the KVM VM state (PIC, IOAPIC, PIT, kvm-clock), every vCPU's state and
//!   every device's state.
//! * `memory`: guest RAM, regions one after the other, zero pages as holes (sparse). A
//!   restored VM maps it `MAP_PRIVATE`, so VMs restored from one snapshot share its pages
//!   in the page cache and copy only what they write.
//!
//! Loading checks the magic, the version ([`FORMAT_VERSION`]), the length and the CRC
//! before parsing, then that the snapshot was taken on this kind of host CPU and KVM
//! ([`HostFingerprint`]): KVM state is saved as raw KVM structures and CPUID tables, which
//! are only valid where they came from. A restore that expects a shape compares it with the
//! saved one ([`SnapshotError::ShapeMismatch`] names the first field that differs). The memory file's size is always checked, its CRC
//! on request ([`verify_memory`]: it reads the whole file, which a fast restore avoids).
//!
//! Both files are written under temporary names and renamed into place, `state` last and
//! the old `state` removed first: a directory with a `state` file holds a complete
//! snapshot, and VMs still running from a replaced memory file keep their (unlinked) copy
//! instead of seeing it truncated under them.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use devices::legacy::SerialPersist;
use devices::virtio::MmioPersist;
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use crate::config::GuestShape;
use crate::host::HostKind;
use crate::memory::{self, MemoryFile};
use crate::vcpu::VcpuState;

/// The snapshot format this podvisor writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// The first bytes of a `state` file.
pub const MAGIC: [u8; 8] = *b"PODVSNAP";
/// Header length of the `state` file.
pub const HEADER_LEN: usize = 24;
/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Where the memory file is written before [`SnapshotState::commit`] puts it in place.
pub const MEMORY_TMP: &str = ".memory.tmp";
const STATE_TMP: &str = ".state.tmp";
/// Largest payload accepted (a sanity bound against a corrupt length).
const MAX_PAYLOAD: u64 = 64 << 20;

/// Errors of taking, reading and restoring snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a podvisor snapshot (bad magic): pass the snapshot directory")]
    NotASnapshot { path: PathBuf },
    #[error(
        "snapshot {path} has format version {found}, this podvisor reads version {FORMAT_VERSION}: \
         take the snapshot again (recreate the template) with this podvisor"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("snapshot {path} is truncated or corrupt: {reason}; take the snapshot again")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "snapshot taken on another host CPU or KVM ({saved}), this host is {current}: saved vCPU \
         state is only valid where it was taken; take the snapshot again on this host"
    )]
    ForeignHost { saved: String, current: String },
    #[error("the VM must be paused (RunningVm::pause) before it is saved")]
    NotPaused,
    #[error("the device event loop did not pause within {0:?}")]
    EventLoopBusy(std::time::Duration),
    #[error(
        "virtio device {index} ({kind}) still has {count} request(s) in flight on queue {queue} \
         after {waited:?}: snapshot at a quiescent point (no I/O in progress)"
    )]
    Busy {
        index: usize,
        kind: &'static str,
        queue: usize,
        count: u16,
        waited: std::time::Duration,
    },
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(
        "the snapshot has {saved} virtio device(s), this VM has {current}: give the restored VM \
         the same disks, shares, vsock and NICs, in the same order"
    )]
    DeviceCount { saved: usize, current: usize },
    #[error("virtio device {index}: {source}")]
    Device {
        index: usize,
        source: devices::virtio::PersistError,
    },
    #[error("serial console: {0}")]
    Serial(#[from] devices::legacy::serial::SerialRestoreError),
    #[error("the snapshot has {saved} vCPU(s) but the VM has {current}")]
    VcpuCount { saved: usize, current: usize },
    #[error(
        "the snapshot's guest differs from the one to restore: {field} is {saved} in the \
         snapshot, {restoring} here; take the snapshot again (recreate the template)"
    )]
    ShapeMismatch {
        /// The first differing field, by its path in [`GuestShape`].
        field: String,
        saved: String,
        restoring: String,
    },
}

impl SnapshotError {
    /// [`SnapshotError::ShapeMismatch`] unless the `restoring` shape is the `saved` one.
    pub fn check_shape(saved: &GuestShape, restoring: &GuestShape) -> Result<(), SnapshotError> {
        saved
            .check_same(restoring)
            .map_err(|m| SnapshotError::ShapeMismatch {
                field: m.field,
                saved: m.ours,
                restoring: m.theirs,
            })
    }
}

/// What identifies the host CPU and KVM a snapshot belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFingerprint {
    /// CPU vendor, family, model, stepping (CPUID leaves 0 and 1).
    pub cpu: String,
    /// CRC-32 of `KVM_GET_SUPPORTED_CPUID`: what KVM can give a guest here.
    pub kvm_cpuid_crc32: u32,
    pub host_kind: HostKind,
}

impl HostFingerprint {
    /// This host's fingerprint.
    pub fn of_this_host(kvm: &Kvm, host_kind: HostKind) -> Result<Self, SnapshotError> {
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| SnapshotError::Kvm {
                what: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        Ok(Self {
            cpu: cpu_signature(),
            kvm_cpuid_crc32: cpuid_crc32(supported.as_slice()),
            host_kind,
        })
    }

    /// [`SnapshotError::ForeignHost`] unless `self` (saved) matches `current`.
    pub fn check(&self, current: &HostFingerprint) -> Result<(), SnapshotError> {
        if self == current {
            Ok(())
        } else {
            Err(SnapshotError::ForeignHost {
                saved: self.to_string(),
                current: current.to_string(),
            })
        }
    }
}

impl std::fmt::Display for HostFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, KVM CPUID table {:08x}, {:?} host",
            self.cpu, self.kvm_cpuid_crc32, self.host_kind
        )
    }
}

/// CRC-32 of a CPUID table without what differs between the host's CPUs (KVM passes the
/// APIC ID of the CPU the caller runs on through in leaves 1, 0xb, 0x1f and 0x8000001e).
fn cpuid_crc32(entries: &[kvm_bindings::kvm_cpuid_entry2]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    for e in entries {
        let (mut ebx, mut edx) = (e.ebx, e.edx);
        match e.function {
            0x1 => ebx &= 0x00ff_ffff,
            0xb | 0x1f => edx = 0,
            0x8000_001e => continue,
            _ => {}
        }
        for word in [e.function, e.index, e.flags, e.eax, ebx, e.ecx, edx] {
            crc.update(&word.to_le_bytes());
        }
    }
    crc.finalize()
}

/// "GenuineIntel family 6 model 85 stepping 7".
fn cpu_signature() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaves 0 and 1 exist on every x86_64 CPU. (`__cpuid` is a safe
        // function in newer Rust, an unsafe one in the project's minimum version.)
        #[allow(unused_unsafe)]
        let (l0, l1) = unsafe { (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1)) };
        let vendor: Vec<u8> = [l0.ebx, l0.edx, l0.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        let base_family = (l1.eax >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((l1.eax >> 20) & 0xff)
        } else {
            base_family
        };
        let model = if base_family == 0x6 || base_family == 0xf {
            ((l1.eax >> 4) & 0xf) | (((l1.eax >> 16) & 0xf) << 4)
        } else {
            (l1.eax >> 4) & 0xf
        };
        format!(
            "{} family {family} model {model} stepping {}",
            String::from_utf8_lossy(&vendor),
            l1.eax & 0xf
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

/// The in-kernel devices' state of the KVM VM.
#[derive(Serialize, Deserialize)]
pub struct KvmVmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    /// kvm-clock: guest time continues from here after a restore.
    pub clock: kvm_clock_data,
}

/// The VMM's devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialPersist,
    /// In MMIO window order (disks, shares, vsock, NICs).
    pub virtio: Vec<MmioPersist>,
}

/// Everything in a snapshot but guest memory.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    pub host: HostFingerprint,
    /// The podvisor (vmm crate) version that wrote it, for people.
    pub podvisor_version: String,
    /// The source VM's shape (none of its host bindings: a restore brings its own).
    pub shape: GuestShape,
    /// The kernel command line the guest booted with.
    pub cmdline: String,
    pub memory: MemoryFile,
    pub vm: KvmVmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

/// What a snapshot holds, in numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub dir: PathBuf,
    /// Bytes of the `state` file.
    pub state_bytes: u64,
    /// Guest RAM size (the memory file's length).
    pub memory_bytes: u64,
    /// Bytes of guest RAM that hold data (the rest is holes).
    pub memory_data_bytes: u64,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Encodes `payload` as a `state` file: header, then payload.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks a `state` file's header and returns its payload.
pub fn decode<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a [u8], SnapshotError> {
    let corrupt = |reason: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::NotASnapshot {
            path: path.to_path_buf(),
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "{} bytes, shorter than the header",
            bytes.len()
        )));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let crc = u32_at(12);
    let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let payload = &bytes[HEADER_LEN..];
    if len > MAX_PAYLOAD || payload.len() as u64 != len {
        return Err(corrupt(format!(
            "the header says {len} bytes of state, the file holds {}",
            payload.len()
        )));
    }
    let computed = crc32fast::hash(payload);
    if computed != crc {
        return Err(corrupt(format!(
            "state checksum {computed:08x}, the header says {crc:08x}"
        )));
    }
    Ok(payload)
}

impl SnapshotState {
    /// Writes `dir/state` and puts the memory file written to `dir/`[`MEMORY_TMP`] in
    /// place (see the module docs for the order). On error neither temporary file is left.
    pub fn commit(&self, dir: &Path) -> Result<u64, SnapshotError> {
        let result = self.try_commit(dir);
        if result.is_err() {
            let _ = fs::remove_file(dir.join(MEMORY_TMP));
            let _ = fs::remove_file(dir.join(STATE_TMP));
        }
        result
    }

    fn try_commit(&self, dir: &Path) -> Result<u64, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let payload = serde_json::to_vec(self).map_err(|e| SnapshotError::Corrupt {
            path: path.clone(),
            reason: format!("cannot encode the state: {e}"),
        })?;
        let bytes = encode(&payload);
        let tmp = dir.join(STATE_TMP);
        let mut file = std::os::unix::fs::OpenOptionsExt::mode(
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true),
            0o600,
        )
        .open(&tmp)
        .map_err(io_err(&tmp))?;
        file.write_all(&bytes).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&path)(e)),
            _ => {}
        }
        let memory = dir.join(MEMORY_FILE);
        fs::rename(dir.join(MEMORY_TMP), &memory).map_err(io_err(&memory))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
        Ok(bytes.len() as u64)
    }

    /// Reads and checks `dir/state` (header, version, CRC; not yet the host).
    pub fn read(dir: &Path) -> Result<SnapshotState, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io_err(&path))?;
        let payload = decode(&path, &bytes)?;
        serde_json::from_slice(payload).map_err(|e| SnapshotError::Corrupt {
            path,
            reason: format!("the state does not parse: {e}"),
        })
    }
}

/// Checks the memory file of the snapshot in `dir` against the CRC in its state (reads the
/// whole file).
pub fn verify_memory(dir: &Path, memory: &MemoryFile) -> Result<(), SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let crc = memory::file_crc32(&path).map_err(io_err(&path))?;
    if crc != memory.crc32 {
        return Err(SnapshotError::Corrupt {
            path,
            reason: format!(
                "memory checksum {crc:08x}, the state says {:08x}",
                memory.crc32
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        encode(br#"{"hello":"snapshot"}"#)
    }

    #[test]
    fn header_round_trip() {
        let bytes = sample();
        assert_eq!(&bytes[..8], b"PODVSNAP");
        assert_eq!(
            decode(Path::new("s"), &bytes).unwrap(),
            br#"{"hello":"snapshot"}"#
        );
    }

    #[test]
    fn corrupt_and_foreign_files_are_refused_with_the_reason() {
        let p = Path::new("/tpl/state");
        let msg = |bytes: &[u8]| decode(p, bytes).unwrap_err().to_string();

        let mut flipped = sample();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(msg(&flipped).contains("checksum"), "{}", msg(&flipped));

        let truncated = &sample()[..sample().len() - 3];
        assert!(msg(truncated).contains("truncated or corrupt"));
        assert!(msg(&sample()[..12]).contains("shorter than the header"));

        let mut newer = sample();
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let m = msg(&newer);
        assert!(
            m.contains(&format!("format version {}", FORMAT_VERSION + 1)) && m.contains("recreate"),
            "{m}"
        );

        assert!(msg(b"\x7fELF....................").contains("not a podvisor snapshot"));
    }

    #[test]
    fn a_restore_names_the_field_its_shape_differs_in() {
        let saved = GuestShape::default();
        assert!(SnapshotError::check_shape(&saved, &saved.clone()).is_ok());
        let restoring = GuestShape {
            mem_mib: 256,
            ..saved.clone()
        };
        let e = SnapshotError::check_shape(&saved, &restoring).unwrap_err();
        assert!(
            matches!(&e, SnapshotError::ShapeMismatch { field, saved, restoring }
                if field == "mem_mib" && saved == "128" && restoring == "256"),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("mem_mib is 128 in the snapshot, 256 here"),
            "{e}"
        );
    }

    #[test]
    fn fingerprints_must_match() {
        let saved = HostFingerprint {
            cpu: "GenuineIntel family 6 model 85 stepping 7".into(),
            kvm_cpuid_crc32: 1,
            host_kind: HostKind::Native,
        };
        assert!(saved.check(&saved.clone()).is_ok());
        let other = HostFingerprint {
            cpu: "AuthenticAMD family 25 model 1 stepping 1".into(),
            ..saved.clone()
        };
        let m = saved.check(&other).unwrap_err().to_string();
        assert!(
            m.contains("another host CPU") && m.contains("AuthenticAMD"),
            "{m}"
        );
        assert!(cpu_signature().contains("family"));
    }

    #[test]
    fn commit_replaces_a_snapshot_whole_and_spares_running_clones() {
        use std::io::Read;

        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let dir = dir.as_path();
        let state = SnapshotState {
            host: HostFingerprint {
                cpu: "test".into(),
                kvm_cpuid_crc32: 0,
                host_kind: HostKind::Native,
            },
            podvisor_version: "test".into(),
            shape: GuestShape::default(),
            cmdline: String::new(),
            memory: MemoryFile {
                regions: Vec::new(),
                size: 3,
                data_pages: 1,
                crc32: 0,
            },
            vm: KvmVmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: Vec::new(),
            devices: DevicesState {
                serial: SerialPersist {
                    baud_divisor_low: 12,
                    baud_divisor_high: 0,
                    interrupt_enable: 0,
                    interrupt_identification: 1,
                    line_control: 3,
                    line_status: 0x60,
                    modem_control: 8,
                    modem_status: 0xb0,
                    scratch: 0,
                    in_buffer: Vec::new(),
                },
                virtio: Vec::new(),
            },
        };
        fs::write(dir.join(MEMORY_TMP), b"old").unwrap();
        state.commit(dir).unwrap();
        let mut running_clone = File::open(dir.join(MEMORY_FILE)).unwrap();
        fs::write(dir.join(MEMORY_TMP), b"new").unwrap();
        state.commit(dir).unwrap();
        let mut seen = String::new();
        running_clone.read_to_string(&mut seen).unwrap();
        assert_eq!(
            seen, "old",
            "a replaced memory file is not rewritten in place"
        );
        assert_eq!(fs::read(dir.join(MEMORY_FILE)).unwrap(), b"new");
        assert_eq!(SnapshotState::read(dir).unwrap().cmdline, "");
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["memory", "state"], "no temporary file left");
        // Without a memory file to put in place, nothing is left either.
        assert!(state.commit(dir).is_err());
        assert!(!dir.join(STATE_TMP).exists());
    }

    #[test]
    fn cpuid_fingerprint_ignores_the_callers_apic_id() {
        let entry = |function, ebx, edx| kvm_bindings::kvm_cpuid_entry2 {
            function,
            ebx,
            edx,
            ..Default::default()
        };
        let on_cpu = |apic: u32| {
            cpuid_crc32(&[
                entry(1, (apic << 24) | 0x800, 0x1234),
                entry(0xb, 1, apic),
                entry(0x8000_001e, apic, apic),
            ])
        };
        assert_eq!(on_cpu(0), on_cpu(1));
        assert_ne!(
            cpuid_crc32(&[entry(1, 0x800, 0x1234)]),
            cpuid_crc32(&[entry(1, 0x800, 0x1235)]),
            "features count"
        );
    }
}
