//! Boot timings and memory use, as `podvisor boot --timings` and `make bench-boot` report
//! them.
//!
//! * host setup: process start (as recorded by the caller, first thing in `main`) to the
//!   first `KVM_RUN` of vCPU 0;
//! * guest to init: first `KVM_RUN` to the guest's boot-timer write;
//! * memory at init: the process's RSS/PSS split into guest RAM (pages the guest touched)
//!   and everything else (the VMM's own overhead), from `/proc/self/smaps`. Guest RAM of a
//!   VM restored from a snapshot is split further: pages still shared with the snapshot's
//!   file (page cache, shared by every clone: `guest_rss_kib - guest_anon_kib`) and the
//!   clone's private copies of the pages it wrote (`guest_anon_kib`).

use std::time::{Duration, Instant};

/// Memory use of the process, split at the guest RAM mappings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Resident memory outside guest RAM (the VMM's overhead), KiB.
    pub vmm_rss_kib: u64,
    /// Proportional set size outside guest RAM, KiB.
    pub vmm_pss_kib: u64,
    /// Resident guest RAM (pages the guest has touched), KiB.
    pub guest_rss_kib: u64,
    /// Proportional set size of guest RAM (shared snapshot pages divided among the VMs
    /// mapping them), KiB.
    pub guest_pss_kib: u64,
    /// Guest RAM that is this VM's own (anonymous): all of it for a booted VM, the
    /// copy-on-write copies for a restored one, KiB.
    pub guest_anon_kib: u64,
}

impl MemoryUsage {
    /// Measures this process. `guest_ranges` are the host (start, length) of guest RAM.
    pub fn measure(guest_ranges: &[(u64, u64)]) -> std::io::Result<MemoryUsage> {
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        Ok(Self::parse_smaps(&smaps, guest_ranges))
    }

    /// Guest RAM still backed by a snapshot file's page cache (restored VMs), KiB.
    pub fn guest_shared_kib(&self) -> u64 {
        self.guest_rss_kib.saturating_sub(self.guest_anon_kib)
    }

    /// Sums `Rss:`, `Pss:` and (guest RAM) `Anonymous:` of the mappings in `smaps`, split
    /// by overlap with guest RAM.
    pub fn parse_smaps(smaps: &str, guest_ranges: &[(u64, u64)]) -> MemoryUsage {
        let mut usage = MemoryUsage::default();
        let mut in_guest = false;
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else { continue };
            if let Some((start, end)) = parse_range(first) {
                in_guest = guest_ranges
                    .iter()
                    .any(|&(g, len)| start < g + len && g < end);
                continue;
            }
            let kib = || {
                words
                    .clone()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            match (first, in_guest) {
                ("Rss:", true) => usage.guest_rss_kib += kib(),
                ("Rss:", false) => usage.vmm_rss_kib += kib(),
                ("Pss:", true) => usage.guest_pss_kib += kib(),
                ("Pss:", false) => usage.vmm_pss_kib += kib(),
                ("Anonymous:", true) => usage.guest_anon_kib += kib(),
                _ => {}
            }
        }
        usage
    }
}

/// Parses a smaps mapping header's `start-end` (hex).
fn parse_range(word: &str) -> Option<(u64, u64)> {
    let (a, b) = word.split_once('-')?;
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

/// What was measured during one boot.
#[derive(Debug, Clone, Default)]
pub struct BootTimings {
    /// Process start → first `KVM_RUN`.
    pub host_setup: Option<Duration>,
    /// First `KVM_RUN` → guest wrote the boot-timer marker.
    pub guest_to_init: Option<Duration>,
    /// Memory use when the marker was written.
    pub memory_at_init: Option<MemoryUsage>,
    /// Memory use when the VM stopped (e.g. a restored VM, which writes no marker).
    pub memory_at_stop: Option<MemoryUsage>,
    /// Process start → VM stopped.
    pub total: Duration,
}

impl BootTimings {
    /// Computes the timings from the recorded instants.
    pub fn from_instants(
        process_start: Instant,
        first_run: Option<Instant>,
        init_marked: Option<Instant>,
        stopped: Instant,
    ) -> BootTimings {
        BootTimings {
            host_setup: first_run.map(|t| t.duration_since(process_start)),
            guest_to_init: first_run
                .zip(init_marked)
                .map(|(r, i)| i.saturating_duration_since(r)),
            memory_at_init: None,
            memory_at_stop: None,
            total: stopped.duration_since(process_start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123 /usr/bin/podvisor
Size:               1024 kB
Rss:                 800 kB
Pss:                 400 kB
7f0000000000-7f0008000000 rw-p 00000000 00:20 77 /var/lib/podvisor/templates/x/memory
Size:             131072 kB
Rss:               26000 kB
Pss:                9000 kB
Anonymous:          1000 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  16 kB
Pss:                  16 kB
VmFlags: rd wr mr mw me gd ac
";

    #[test]
    fn splits_guest_and_vmm_memory() {
        let usage = MemoryUsage::parse_smaps(SMAPS, &[(0x7f00_0000_0000, 128 << 20)]);
        assert_eq!(
            usage,
            MemoryUsage {
                vmm_rss_kib: 816,
                vmm_pss_kib: 416,
                guest_rss_kib: 26000,
                guest_pss_kib: 9000,
                guest_anon_kib: 1000,
            }
        );
        assert_eq!(usage.guest_shared_kib(), 25000);
    }

    #[test]
    fn measures_this_process() {
        let usage = MemoryUsage::measure(&[]).unwrap();
        assert!(usage.vmm_rss_kib > 0);
        assert_eq!(usage.guest_rss_kib, 0);
    }

    #[test]
    fn timings_from_instants() {
        let t0 = Instant::now();
        let run = t0 + Duration::from_millis(30);
        let init = run + Duration::from_secs(45);
        let t =
            BootTimings::from_instants(t0, Some(run), Some(init), init + Duration::from_secs(1));
        assert_eq!(t.host_setup, Some(Duration::from_millis(30)));
        assert_eq!(t.guest_to_init, Some(Duration::from_secs(45)));
        let none = BootTimings::from_instants(t0, None, None, t0);
        assert_eq!((none.host_setup, none.guest_to_init), (None, None));
    }
}
