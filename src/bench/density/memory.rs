//! Host memory of a pod, from `/proc`.
//!
//! * A pod's processes: its shim (found by binary name, `-id` and `-address` on its command
//!   line) and every descendant (runc's container processes are re-parented to the runc
//!   shim, a child subreaper; podvisor's shim has none: the VM lives in the shim).
//! * PSS per process from `/proc/PID/smaps_rollup`; for podvisor also `/proc/PID/smaps`,
//!   split into guest RAM (anonymous mappings exactly as large as a guest RAM region: the VM's
//!   memory size below the 3 GiB MMIO gap) and everything else (VMM + shim overhead).
//! * The machine: `MemTotal - MemAvailable` and `Committed_AS` from `/proc/meminfo`, KSM's
//!   counters from `/sys/kernel/mm/ksm`.

/// Errors reading memory figures.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "cannot read {path}: {source} (the process may have exited; is the pod still running?)"
    )]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} has no `{field}` line: this harness needs Linux >= 4.14 /proc files")]
    Field { path: String, field: &'static str },
}

fn read(path: &str) -> Result<String, MemoryError> {
    std::fs::read_to_string(path).map_err(|source| MemoryError::Read {
        path: path.to_string(),
        source,
    })
}

/// The `kB` value of `field:` in a `/proc` key-value file (smaps_rollup, meminfo).
pub fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// RSS and PSS of one process (smaps_rollup), KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rollup {
    pub rss_kib: u64,
    pub pss_kib: u64,
    /// Pages mapped by this process only (Private_Clean + Private_Dirty): what it would
    /// free on exit. PSS minus this is its share of pages others map too (a template
    /// clone's share of the template's memory file in the page cache).
    pub private_kib: u64,
}

/// Parses `/proc/PID/smaps_rollup` text.
pub fn parse_rollup(text: &str) -> Option<Rollup> {
    Some(Rollup {
        rss_kib: kib_field(text, "Rss")?,
        pss_kib: kib_field(text, "Pss")?,
        private_kib: kib_field(text, "Private_Clean").unwrap_or(0)
            + kib_field(text, "Private_Dirty").unwrap_or(0),
    })
}

/// `/proc/PID/smaps_rollup` of `pid`.
pub fn rollup(pid: u32) -> Result<Rollup, MemoryError> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = read(&path)?;
    parse_rollup(&text).ok_or(MemoryError::Field { path, field: "Pss" })
}

/// PSS of a process split at its guest RAM mappings, KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestSplit {
    /// PSS of the guest RAM mappings (pages the guest touched; KSM-merged pages shared).
    pub guest_pss_kib: u64,
    /// PSS of everything else: the VMM's and the shim's own memory.
    pub other_pss_kib: u64,
    /// How many guest RAM mappings were found (1 for guests below the MMIO gap).
    pub guest_mappings: usize,
    /// Whether they were recognised by their `dd` (MADV_DONTDUMP) flag, which podvisor's
    /// VMM sets on guest RAM, rather than by size alone.
    pub by_flag: bool,
}

/// One mapping of smaps: size, PSS, anonymous or not, VmFlags.
struct Mapping {
    size: u64,
    pss_kib: u64,
    anonymous: bool,
    dontdump: bool,
}

fn mappings(smaps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((start, end)) = parse_range(first) {
            // `start-end perms offset dev inode [path]`: anonymous when there is no path.
            out.push(Mapping {
                size: end - start,
                pss_kib: 0,
                anonymous: words.nth(4).is_none(),
                dontdump: false,
            });
            continue;
        }
        let Some(m) = out.last_mut() else { continue };
        match first {
            "Pss:" => m.pss_kib = words.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "VmFlags:" => m.dontdump = words.any(|f| f == "dd"),
            _ => {}
        }
    }
    out
}

/// Splits `/proc/PID/smaps` text: guest RAM is the mappings whose size is one of
/// `guest_region_sizes` (bytes) and that carry the `dd` flag podvisor sets on guest RAM
/// (anonymous for a booted VM, the snapshot's memory file mapped private for a VM restored
/// from a template); when none carries it (a VMM from before that flag), anonymous
/// mappings of that size.
pub fn split_smaps(smaps: &str, guest_region_sizes: &[u64]) -> GuestSplit {
    let maps = mappings(smaps);
    let sized = |m: &Mapping| guest_region_sizes.contains(&m.size);
    let by_flag = maps.iter().any(|m| sized(m) && m.dontdump);
    let candidate = |m: &Mapping| sized(m) && (m.dontdump || m.anonymous);
    let mut split = GuestSplit {
        by_flag,
        ..GuestSplit::default()
    };
    for m in &maps {
        if candidate(m) && (m.dontdump || !by_flag) {
            split.guest_pss_kib += m.pss_kib;
            split.guest_mappings += 1;
        } else {
            split.other_pss_kib += m.pss_kib;
        }
    }
    split
}

/// Anonymous mappings of at least `min` bytes with their VmFlags (for error messages).
pub fn large_anonymous(smaps: &str, min: u64) -> Vec<String> {
    mappings(smaps)
        .iter()
        .filter(|m| m.anonymous && m.size >= min)
        .map(|m| {
            format!(
                "{} MiB{}",
                m.size >> 20,
                if m.dontdump { " dd" } else { "" }
            )
        })
        .collect()
}

/// A smaps mapping header's `start-end` (hex), `None` for other lines.
fn parse_range(word: &str) -> Option<(u64, u64)> {
    let (a, b) = word.split_once('-')?;
    let start = u64::from_str_radix(a, 16).ok()?;
    let end = u64::from_str_radix(b, 16).ok()?;
    (end >= start).then_some((start, end))
}

/// Host sizes of guest RAM mappings for a VM of `mem_mib` (the VMM's own layout).
pub fn guest_region_sizes(mem_mib: u64) -> Vec<u64> {
    vmm::guest_ram_mapping_sizes(mem_mib)
}

/// Machine-wide figures from `/proc/meminfo`, KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemInfo {
    pub total_kib: u64,
    /// `MemTotal - MemAvailable`.
    pub used_kib: u64,
    /// `Committed_AS`: what MAP_NORESERVE keeps out.
    pub committed_kib: u64,
}

impl MemInfo {
    /// How much more is used than in `before`, KiB (negative where less is).
    pub fn used_delta_kib(&self, before: &MemInfo) -> i64 {
        // Meminfo figures are far below 2^63 KiB: the clamp never bites.
        let kib = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        kib(self.used_kib) - kib(before.used_kib)
    }
}

/// Parses `/proc/meminfo` text.
pub fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let total = kib_field(text, "MemTotal")?;
    let available = kib_field(text, "MemAvailable")?;
    Some(MemInfo {
        total_kib: total,
        used_kib: total.saturating_sub(available),
        committed_kib: kib_field(text, "Committed_AS")?,
    })
}

/// This machine's `/proc/meminfo`.
pub fn meminfo() -> Result<MemInfo, MemoryError> {
    let path = "/proc/meminfo";
    parse_meminfo(&read(path)?).ok_or(MemoryError::Field {
        path: path.into(),
        field: "MemAvailable",
    })
}

pub use podvisor_test_kit::processes::{descendants, shim_pids};

pub use vmm::clock_ticks_per_sec;

/// A process's CPU time so far (user + system, every thread), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    vmm::stat_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// KSM's state (`/sys/kernel/mm/ksm`): `run` and `pages_sharing` (pages saved).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KsmState {
    pub run: Option<u32>,
    pub pages_sharing: Option<u64>,
}

pub const KSM_DIR: &str = "/sys/kernel/mm/ksm";

/// Reads KSM's `run` and `pages_sharing` (`None` where the kernel has no KSM).
pub fn ksm_state() -> KsmState {
    let num = |f: &str| {
        std::fs::read_to_string(format!("{KSM_DIR}/{f}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    KsmState {
        run: num("run").and_then(|v| u32::try_from(v).ok()),
        pages_sharing: num("pages_sharing"),
    }
}

/// Writes KSM's `run` (0 stop, 1 merge); the error says why (e.g. read-only sysfs).
pub fn set_ksm_run(value: u32) -> std::io::Result<()> {
    std::fs::write(format!("{KSM_DIR}/run"), format!("{value}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From a real `containerd-shim-podvisor-v2` (trimmed: the guest RAM mapping of a
    /// 128 MiB VM, the binary, heap, a thread stack and the vDSO).
    const PODVISOR_SMAPS: &str = "\
5581c8a00000-5581c8c3e000 r--p 00000000 fe:01 1311283                    /work/target/release/containerd-shim-podvisor-v2
Size:               2296 kB
KernelPageSize:        4 kB
Rss:                2048 kB
Pss:                1024 kB
Pss_Dirty:             0 kB
Shared_Clean:       2048 kB
5581ca1f7000-5581ca22d000 rw-p 00000000 00:00 0                          [heap]
Size:                216 kB
Rss:                 120 kB
Pss:                 120 kB
7f3c40000000-7f3c48000000 rw-p 00000000 00:00 0 
Size:             131072 kB
KernelPageSize:        4 kB
Rss:               27904 kB
Pss:               27904 kB
Pss_Anon:          27904 kB
AnonHugePages:         0 kB
VmFlags: rd wr mr mw me nr dd sd 
7f3c50000000-7f3c58000000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:                 512 kB
Pss:                 512 kB
VmFlags: rd wr mr mw me nr 
7f3c4b7ff000-7f3c4bfff000 rw-p 00000000 00:00 0 
Size:               8192 kB
Rss:                  16 kB
Pss:                  16 kB
7ffc1b5e3000-7ffc1b5e5000 r-xp 00000000 00:00 0                          [vdso]
Size:                  8 kB
Rss:                   4 kB
Pss:                   0 kB
";

    const ROLLUP: &str = "\
55d1c6a3b000-7ffd4b1f2000 ---p 00000000 00:00 0                          [rollup]
Rss:               30088 kB
Pss:               29064 kB
Pss_Dirty:         28040 kB
Pss_Anon:          28040 kB
Pss_File:           1024 kB
Shared_Clean:       2048 kB
Private_Clean:        40 kB
Private_Dirty:     28000 kB
";

    const MEMINFO: &str = "\
MemTotal:       24583712 kB
MemFree:        19912876 kB
MemAvailable:   23012456 kB
Buffers:          123456 kB
Committed_AS:    3456789 kB
";

    #[test]
    fn splits_guest_ram_from_vmm_overhead() {
        // The 128 MiB malloc arena without `dd` is the VMM's, not guest RAM.
        let split = split_smaps(PODVISOR_SMAPS, &guest_region_sizes(128));
        assert_eq!(
            split,
            GuestSplit {
                guest_pss_kib: 27904,
                other_pss_kib: 1024 + 120 + 512 + 16,
                guest_mappings: 1,
                by_flag: true,
            }
        );
        // A restored clone: guest RAM is the snapshot file mapped private, flagged `dd`.
        let restored = PODVISOR_SMAPS.replace(
            "7f3c40000000-7f3c48000000 rw-p 00000000 00:00 0 ",
            "7f3c40000000-7f3c48000000 rw-p 00000000 fe:01 77 /tmp/t/memory",
        );
        assert_eq!(split_smaps(&restored, &guest_region_sizes(128)), split);
        // Without the flag (an older VMM), size alone decides.
        let old = split_smaps(
            &PODVISOR_SMAPS.replace(" dd ", " "),
            &guest_region_sizes(128),
        );
        assert_eq!((old.guest_mappings, old.by_flag), (2, false));
        assert_eq!(old.guest_pss_kib, 27904 + 512);
        // No mapping of the guest's size: everything is overhead.
        let none = split_smaps(PODVISOR_SMAPS, &guest_region_sizes(64));
        assert_eq!(none.guest_mappings, 0);
        assert_eq!(none.other_pss_kib, 27904 + 1024 + 120 + 512 + 16);
        assert_eq!(
            large_anonymous(PODVISOR_SMAPS, 64 << 20),
            vec!["128 MiB dd", "128 MiB"]
        );
    }

    #[test]
    fn guest_regions_around_the_gap() {
        assert_eq!(guest_region_sizes(256), vec![256 << 20]);
        assert_eq!(guest_region_sizes(4096), vec![3 << 30, 1 << 30]);
    }

    #[test]
    fn used_delta_is_signed() {
        let used = |used_kib| MemInfo {
            used_kib,
            ..MemInfo::default()
        };
        assert_eq!(used(25).used_delta_kib(&used(10)), 15);
        assert_eq!(used(10).used_delta_kib(&used(25)), -15);
    }

    #[test]
    fn parses_rollup_and_meminfo() {
        assert_eq!(
            parse_rollup(ROLLUP),
            Some(Rollup {
                rss_kib: 30088,
                pss_kib: 29064,
                private_kib: 28040,
            })
        );
        assert_eq!(parse_rollup("Rss: 1 kB\n"), None);
        assert_eq!(kib_field(ROLLUP, "Pss_Anon"), Some(28040));
        let m = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(m.used_kib, 24583712 - 23012456);
        assert_eq!(m.committed_kib, 3456789);
        assert!(parse_meminfo("MemTotal: 1 kB\n").is_none());
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let r = rollup(me).unwrap();
        assert!(r.pss_kib > 0 && r.rss_kib >= r.pss_kib);
        let split = split_smaps(&read(&format!("/proc/{me}/smaps")).unwrap(), &[]);
        assert_eq!(split.guest_pss_kib, 0);
        assert!(split.other_pss_kib > 0);
        assert!(meminfo().unwrap().used_kib > 0);
        assert!(matches!(rollup(u32::MAX), Err(MemoryError::Read { .. })));
    }
}
