//! A sampling profile of where the guest's vCPUs are: a diagnostic for start-time work,
//! off unless [`HostSettings::profile_hz`](crate::HostSettings) asks for it.
//!
//! A sampler thread kicks every running vCPU thread `profile_hz` times a second with the
//! same signal that pauses it; the vCPU thread, back from `KVM_RUN` with `EINTR` and a
//! sample requested, reads the guest's RIP and privilege level and counts it. A vCPU halted
//! in the in-kernel irqchip is sampled at its `hlt` (the guest's idle function), so idle
//! time shows up as such. Samples are taken with [`GuestProfileHandle::take`], which also
//! resets them: the shim's start timeline takes one profile per phase. [`SymbolMap`] turns
//! kernel addresses into function names from the kernel's `System.map`.
//!
//! The guest chooses its RIPs, so a period keeps at most [`MAX_RIPS`] distinct ones and
//! counts the rest as unrecorded. Each sample is one extra exit (counted as "interrupted" in [`crate::VmStats`]) and two
//! register reads; at 1 kHz that is well under 1% of a vCPU.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::stats::VmCounters;

/// Samples of one period.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestSamples {
    /// Guest-kernel samples by RIP.
    pub kernel: HashMap<u64, u64>,
    /// Samples at CPL 3 (guest user space).
    pub user: u64,
    /// Samples of vCPUs that have not started (real mode: parked beyond the guest's
    /// `maxcpus`, or never woken).
    pub not_started: u64,
    /// Kernel samples at RIPs beyond the first [`MAX_RIPS`] of the period (the guest
    /// chooses its RIPs: the map of them is bounded).
    pub unrecorded: u64,
}

/// The most distinct guest-kernel RIPs one period of samples keeps.
pub const MAX_RIPS: usize = 16_384;

impl GuestSamples {
    /// Every sample.
    pub fn total(&self) -> u64 {
        self.user + self.not_started + self.unrecorded + self.kernel.values().sum::<u64>()
    }

    /// Samples per function, most first: kernel RIPs named through `symbols` (unknown ones
    /// as `?`), user-space ones as `[user]`, vCPUs not started as `[not started]`.
    pub fn by_function(&self, symbols: &SymbolMap) -> Vec<(String, u64)> {
        let mut by: HashMap<&str, u64> = HashMap::new();
        for (&rip, &n) in &self.kernel {
            *by.entry(symbols.name(rip).unwrap_or("?")).or_default() += n;
        }
        let mut out: Vec<(String, u64)> = by.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        if self.user > 0 {
            out.push(("[user]".to_string(), self.user));
        }
        if self.not_started > 0 {
            out.push(("[not started]".to_string(), self.not_started));
        }
        if self.unrecorded > 0 {
            out.push(("[unrecorded]".to_string(), self.unrecorded));
        }
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }
}

/// Where a sampled vCPU was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Where {
    /// In the guest kernel, at this RIP.
    Kernel(u64),
    /// In guest user space (CPL 3).
    User,
    /// Not started: still in real mode (CR0.PE clear).
    NotStarted,
}

impl Where {
    /// Where a vCPU with these registers is.
    pub fn of(rip: u64, cr0: u64, cs_selector: u16) -> Where {
        if cr0 & 1 == 0 {
            Where::NotStarted
        } else if cs_selector & 3 == 3 {
            Where::User
        } else {
            Where::Kernel(rip)
        }
    }
}

/// The profile state a VM's vCPU threads and sampler share.
#[derive(Debug)]
pub(crate) struct ProfileShared {
    /// A sample is wanted from vCPU `i`.
    requested: Vec<AtomicBool>,
    samples: Mutex<GuestSamples>,
    stop: AtomicBool,
}

impl ProfileShared {
    /// Whether vCPU `id` owes a sample (clears the request).
    pub fn wants_sample(&self, id: usize) -> bool {
        self.requested
            .get(id)
            .is_some_and(|r| r.swap(false, Ordering::Relaxed))
    }

    /// Counts one sample.
    pub fn record(&self, at: Where) {
        let mut s = crate::lock(&self.samples);
        match at {
            Where::User => s.user += 1,
            Where::NotStarted => s.not_started += 1,
            Where::Kernel(rip) => {
                if let Some(n) = s.kernel.get_mut(&rip) {
                    *n += 1;
                } else if s.kernel.len() < MAX_RIPS {
                    s.kernel.insert(rip, 1);
                } else {
                    s.unrecorded += 1;
                }
            }
        }
    }
}

/// The VM's sampler thread; stops when dropped.
pub(crate) struct Sampler {
    shared: Arc<ProfileShared>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling the vCPU threads `counters` knows, `hz` times a second.
    pub fn start(hz: u32, counters: Arc<VmCounters>, vcpus: usize) -> std::io::Result<Self> {
        let shared = Arc::new(ProfileShared {
            requested: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            samples: Mutex::new(GuestSamples::default()),
            stop: AtomicBool::new(false),
        });
        let period = Duration::from_secs(1) / hz.max(1);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vm-profile".into())
            .spawn(move || {
                // SAFETY: getpid has no preconditions.
                let pid = unsafe { libc::getpid() };
                while !s.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(period);
                    for (id, tid) in counters.vcpu_thread_ids().into_iter().enumerate() {
                        if tid <= 0 {
                            continue;
                        }
                        s.requested[id].store(true, Ordering::Relaxed);
                        // SAFETY: tgkill with this process's id and one of its threads'
                        // ids; the kick handler only sets `immediate_exit`.
                        unsafe {
                            libc::syscall(libc::SYS_tgkill, pid, tid, crate::vcpu::kick_signal())
                        };
                    }
                }
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    pub fn shared(&self) -> Arc<ProfileShared> {
        self.shared.clone()
    }

    pub fn handle(&self) -> GuestProfileHandle {
        GuestProfileHandle(self.shared.clone())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A handle on a profiled VM's samples, usable from any thread.
#[derive(Debug, Clone)]
pub struct GuestProfileHandle(Arc<ProfileShared>);

impl GuestProfileHandle {
    /// The samples since the last `take`, and a fresh start.
    pub fn take(&self) -> GuestSamples {
        std::mem::take(&mut *crate::lock(&self.0.samples))
    }
}

/// Kernel text symbols from a `System.map` (`address type name` lines), for naming RIPs.
#[derive(Debug, Default, Clone)]
pub struct SymbolMap {
    /// (start address, name), sorted by address.
    symbols: Vec<(u64, String)>,
}

impl SymbolMap {
    /// Parses `System.map` text; lines that are not text symbols are skipped.
    pub fn parse(text: &str) -> Self {
        let mut symbols: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut f = line.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let kind = f.next()?;
                let name = f.next()?;
                matches!(kind, "t" | "T" | "w" | "W").then(|| (addr, name.to_string()))
            })
            .collect();
        symbols.sort_by_key(|s| s.0);
        Self { symbols }
    }

    /// Reads `path` (a kernel's `System.map`).
    pub fn load(path: &Path) -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string(path)?))
    }

    /// The function `rip` is in: the last symbol at or below it.
    pub fn name(&self, rip: u64) -> Option<&str> {
        let i = self.symbols.partition_point(|s| s.0 <= rip);
        i.checked_sub(1).map(|i| self.symbols[i].1.as_str())
    }

    /// Whether the map has no symbols.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
ffffffff81000000 T _text
ffffffff81001000 T do_one_initcall
ffffffff81001200 t helper
ffffffff81002000 D some_data
ffffffff81003000 W weak_fn
";

    #[test]
    fn rips_name_the_function_they_are_in() {
        let m = SymbolMap::parse(MAP);
        assert_eq!(m.name(0xffffffff81001000), Some("do_one_initcall"));
        assert_eq!(m.name(0xffffffff810011ff), Some("do_one_initcall"));
        assert_eq!(m.name(0xffffffff81001200), Some("helper"));
        // Data symbols are not functions: text before them still names the RIP.
        assert_eq!(m.name(0xffffffff81002010), Some("helper"));
        assert_eq!(m.name(0xffffffff81003004), Some("weak_fn"));
        assert_eq!(m.name(0xffffffff80000000), None);
    }

    #[test]
    fn samples_group_by_function_with_user_space_apart() {
        let m = SymbolMap::parse(MAP);
        let s = GuestSamples {
            kernel: HashMap::from([
                (0xffffffff81001004, 3),
                (0xffffffff81001100, 2),
                (0xffffffff81001204, 4),
                (0x1000, 1),
            ]),
            user: 7,
            not_started: 2,
            unrecorded: 0,
        };
        assert_eq!(s.total(), 19);
        assert_eq!(
            s.by_function(&m),
            [
                ("[user]".to_string(), 7),
                ("do_one_initcall".to_string(), 5),
                ("helper".to_string(), 4),
                ("[not started]".to_string(), 2),
                ("?".to_string(), 1),
            ]
        );
    }

    #[test]
    fn a_guest_that_spreads_its_rips_cannot_grow_the_map_past_its_bound() {
        let shared = ProfileShared {
            requested: Vec::new(),
            samples: Mutex::new(GuestSamples::default()),
            stop: AtomicBool::new(false),
        };
        let n = MAX_RIPS as u64 + 1000;
        for i in 0..n {
            shared.record(Where::Kernel(0xffffffff81000000 + i));
        }
        shared.record(Where::Kernel(0xffffffff81000000));
        let s = GuestProfileHandle(Arc::new(shared)).take();
        assert_eq!(s.kernel.len(), MAX_RIPS);
        assert_eq!(s.unrecorded, 1000);
        assert_eq!(s.total(), n + 1, "every sample counted");
        assert_eq!(s.kernel[&0xffffffff81000000], 2, "known RIPs still count");
    }

    #[test]
    fn a_sampled_thread_records_only_when_asked() {
        let shared = ProfileShared {
            requested: (0..2).map(|_| AtomicBool::new(false)).collect(),
            samples: Mutex::new(GuestSamples::default()),
            stop: AtomicBool::new(false),
        };
        assert!(!shared.wants_sample(0));
        shared.requested[1].store(true, Ordering::Relaxed);
        assert!(shared.wants_sample(1));
        assert!(!shared.wants_sample(1), "one request, one sample");
        assert!(!shared.wants_sample(7), "no such vCPU");
        shared.record(Where::of(0xffffffff81001004, 0x8005_0033, 0x10));
        shared.record(Where::of(0x400000, 0x8005_0033, 0x33));
        shared.record(Where::of(0xfff0, 0x6000_0010, 0xf000));
        let h = GuestProfileHandle(Arc::new(shared));
        let s = h.take();
        assert_eq!((s.user, s.not_started, s.kernel.len()), (1, 1, 1));
        assert_eq!(h.take().total(), 0, "take resets");
    }
}
