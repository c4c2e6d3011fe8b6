//! A pod's start, phase by phase, from monotonic timestamps in the shim: when the Create
//! that brought the pod up arrived, when its VM source was chosen (template found or
//! built, or a cold boot), the VM ran, the agent answered, the sandbox and its network were
//! set up, and — for the pod's first workload container — its rootfs was mounted, it was
//! created and started, and its first output byte reached the host.
//!
//! Each mark also holds what the VM had cost by then (KVM exits by kind, vCPU CPU time,
//! [`vmm::VmStats`]) and the shim process's CPU time, so each phase's cost is the
//! difference between two marks. When the first output arrives (or the pod goes down
//! first) the timeline is logged as one info line and written as JSON to the pod's state
//! dir (`timeline.json`, [`TimelineRecord`]), where `podvisor bench` reads it.
//!
//! With `guest_profile_hz` set, each mark also holds where the guest's vCPUs were during
//! the phase it ends: the most sampled guest-kernel functions (named from the kernel's
//! `System.map`, next to the kernel) and the samples in guest user space.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use vmm::{GuestProfileHandle, SymbolMap, VmStats, VmStatsHandle};

/// Functions kept per phase in a guest profile; the rest are summed as `(other)`.
const PROFILE_TOP: usize = 40;

/// Samples of one function (or `[user]`, `(other)`) in a phase's guest profile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProfileEntry {
    pub function: String,
    pub samples: u64,
}

/// The phases, in the order a pod goes through them.
pub mod phase {
    /// The Create that brings the pod up arrived (the timeline's zero).
    pub const CREATE: &str = "create";
    /// The VM's source is known: a template found or built, or a cold boot.
    pub const SOURCE: &str = "source";
    /// The VM runs (restored or booted, vCPU threads started).
    pub const VM: &str = "vm";
    /// The agent answered its version.
    pub const AGENT: &str = "agent";
    /// CreateSandbox done.
    pub const SANDBOX: &str = "sandbox";
    /// The pod's network configured in the guest.
    pub const NETWORK: &str = "network";
    /// The first workload container's rootfs and volumes mounted into the share.
    pub const ROOTFS: &str = "rootfs";
    /// CreateContainer done in the guest.
    pub const CONTAINER: &str = "container";
    /// StartContainer done.
    pub const START: &str = "start";
    /// The container's first output byte reached the host.
    pub const OUTPUT: &str = "output";
}

/// One point of the timeline.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Mark {
    pub phase: String,
    /// Since the Create arrived, ms.
    pub at_ms: f64,
    /// The VM's costs so far (none before it runs).
    pub vm: Option<VmStats>,
    /// The shim process's CPU time so far (every thread, vCPUs included), ms.
    pub process_cpu_ms: f64,
    /// Where the guest was since the previous mark, most sampled first (a profiled pod
    /// only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_profile: Vec<ProfileEntry>,
}

/// A pod's timeline as logged and written.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimelineRecord {
    pub pod: String,
    /// How the VM came up: `template`, `template-built` or `boot`.
    pub source: Option<String>,
    /// The workload container the container phases are of.
    pub container: Option<String>,
    /// Whether it reached the first output.
    pub complete: bool,
    pub marks: Vec<Mark>,
}

#[derive(Debug, Default)]
struct Inner {
    record: TimelineRecord,
    finished: bool,
    file: Option<PathBuf>,
}

/// A pod's start timeline; cheap to mark from any thread.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    inner: Mutex<Inner>,
    vm: OnceLock<VmStatsHandle>,
    profile: OnceLock<(GuestProfileHandle, SymbolMap)>,
}

/// The process's CPU time so far, ms.
fn process_cpu_ms() -> f64 {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

impl Timeline {
    /// The timeline of pod `pod`, whose bringing-up Create arrived at `start`.
    pub fn new(pod: &str, start: Instant) -> Arc<Timeline> {
        let t = Arc::new(Timeline {
            start,
            inner: Mutex::new(Inner {
                record: TimelineRecord {
                    pod: pod.to_string(),
                    ..TimelineRecord::default()
                },
                ..Inner::default()
            }),
            vm: OnceLock::new(),
            profile: OnceLock::new(),
        });
        t.push(phase::CREATE, start);
        t
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, phase: &str, at: Instant) {
        let vm = self.vm.get().map(VmStatsHandle::read);
        let guest_profile = self
            .profile
            .get()
            .map(|(handle, symbols)| top_functions(&handle.take(), symbols))
            .unwrap_or_default();
        let mut inner = self.lock();
        if inner.finished {
            return;
        }
        inner.record.marks.push(Mark {
            phase: phase.to_string(),
            at_ms: at.saturating_duration_since(self.start).as_secs_f64() * 1000.0,
            vm,
            process_cpu_ms: process_cpu_ms(),
            guest_profile,
        });
    }

    /// Marks pod-level `phase` now.
    pub fn mark(&self, phase: &str) {
        self.push(phase, Instant::now());
    }

    /// How the VM came up (`template`, `template-built`, `boot`).
    pub fn set_source(&self, source: &str) {
        self.lock().record.source = Some(source.to_string());
    }

    /// The running VM's counters, read at every later mark.
    pub fn set_vm(&self, stats: VmStatsHandle) {
        let _ = self.vm.set(stats);
    }

    /// The VM's guest profile, taken at every later mark; kernel functions are named from
    /// `system_map` (unnamed, as `?`, if it cannot be read).
    pub fn set_profile(&self, profile: GuestProfileHandle, system_map: &std::path::Path) {
        let symbols = SymbolMap::load(system_map).unwrap_or_else(|e| {
            log::warn!(
                "guest profile: cannot read {}: {e}; kernel functions stay unnamed",
                system_map.display()
            );
            SymbolMap::default()
        });
        // What ran before the VM started belongs to no phase.
        profile.take();
        let _ = self.profile.set((profile, symbols));
    }

    /// Where the JSON goes when the timeline is finished.
    pub fn set_file(&self, path: PathBuf) {
        self.lock().file = Some(path);
    }

    /// Container `id` takes the container phases if no container has (the pod's first
    /// workload container); returns whether `id` has them.
    pub fn claim(&self, id: &str) -> bool {
        let mut inner = self.lock();
        match &inner.record.container {
            Some(c) => c == id,
            None if !inner.finished => {
                inner.record.container = Some(id.to_string());
                true
            }
            None => false,
        }
    }

    /// Marks container `id`'s `phase` now, if `id` has the container phases.
    pub fn mark_container(&self, id: &str, phase: &str) {
        let ours = self.lock().record.container.as_deref() == Some(id);
        if ours {
            self.mark(phase);
            if phase == phase::OUTPUT {
                self.finish(true);
            }
        }
    }

    /// Ends the timeline (`complete`: the first output came): logs it once and writes it.
    pub fn finish(&self, complete: bool) {
        let (record, file) = {
            let mut inner = self.lock();
            if inner.finished {
                return;
            }
            inner.finished = true;
            inner.record.complete = complete;
            (inner.record.clone(), inner.file.clone())
        };
        log::info!("{}", summary(&record));
        if let Some(path) = file {
            let text = serde_json::to_vec_pretty(&record).unwrap_or_default();
            if let Err(e) = std::fs::write(&path, text) {
                log::warn!("pod {}: cannot write {}: {e}", record.pod, path.display());
            }
        }
    }

    /// The timeline so far.
    pub fn record(&self) -> TimelineRecord {
        self.lock().record.clone()
    }
}

/// The `PROFILE_TOP` most sampled functions of `samples`, then `(other)` for the rest.
fn top_functions(samples: &vmm::GuestSamples, symbols: &SymbolMap) -> Vec<ProfileEntry> {
    let all = samples.by_function(symbols);
    let rest: u64 = all.iter().skip(PROFILE_TOP).map(|f| f.1).sum();
    let mut top: Vec<ProfileEntry> = all
        .into_iter()
        .take(PROFILE_TOP)
        .map(|(function, samples)| ProfileEntry { function, samples })
        .collect();
    if rest > 0 {
        top.push(ProfileEntry {
            function: "(other)".into(),
            samples: rest,
        });
    }
    top
}

/// One line: each phase's duration and the VM's exits and vCPU time in it, then totals.
pub fn summary(r: &TimelineRecord) -> String {
    let mut line = format!(
        "pod {} start{} ({}):",
        r.pod,
        if r.complete {
            ""
        } else {
            " (no output before it ended)"
        },
        r.source.as_deref().unwrap_or("no VM")
    );
    let zero = VmStats::default();
    for pair in r.marks.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let d = b.vm.unwrap_or(zero).since(&a.vm.unwrap_or(zero));
        line.push_str(&format!(" {} +{:.0} ms", b.phase, b.at_ms - a.at_ms));
        if d.exits() > 0 || d.vcpu_cpu_ns > 0 {
            line.push_str(&format!(
                " [{} exits, vCPU {:.0} ms]",
                d.exits(),
                d.vcpu_cpu_ns as f64 / 1e6
            ));
        }
        line.push(',');
    }
    let last = r.marks.last();
    let vm = last.and_then(|m| m.vm).unwrap_or(zero);
    line.push_str(&format!(
        " total {:.0} ms; VM: {} exits (port I/O {}, MMIO {}, interrupted {}, other {}), vCPU {:.0} ms; shim process CPU {:.0} ms",
        last.map_or(0.0, |m| m.at_ms),
        vm.exits(),
        vm.exits_port_io,
        vm.exits_mmio,
        vm.exits_interrupted,
        vm.exits_other,
        vm.vcpu_cpu_ns as f64 / 1e6,
        last.map_or(0.0, |m| m.process_cpu_ms),
    ));
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn phases_are_marked_once_for_the_first_container_and_written_at_the_first_output() {
        let dir = tempfile::tempdir().unwrap();
        let t = Timeline::new("p1", Instant::now());
        t.set_file(dir.path().join("timeline.json"));
        t.set_source("template");
        std::thread::sleep(Duration::from_millis(5));
        t.mark(phase::SOURCE);
        assert!(t.claim("c1"));
        assert!(t.claim("c1"));
        assert!(!t.claim("c2"), "the first workload container has them");
        t.mark_container("c2", phase::ROOTFS);
        t.mark_container("c1", phase::ROOTFS);
        t.mark_container("c1", phase::OUTPUT);
        t.mark(phase::SANDBOX);
        let r = t.record();
        let phases: Vec<&str> = r.marks.iter().map(|m| m.phase.as_str()).collect();
        assert_eq!(phases, ["create", "source", "rootfs", "output"]);
        assert!(r.complete);
        assert!(r.marks[1].at_ms >= 5.0);
        assert!(r.marks.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        let written: TimelineRecord =
            serde_json::from_slice(&std::fs::read(dir.path().join("timeline.json")).unwrap())
                .unwrap();
        assert_eq!(written, r);
        let line = summary(&r);
        assert!(
            line.starts_with("pod p1 start (template): source +"),
            "{line}"
        );
        assert!(line.contains(" output +"), "{line}");
    }

    #[test]
    fn a_pod_that_ends_before_any_output_is_logged_incomplete() {
        let t = Timeline::new("p2", Instant::now());
        t.mark(phase::SOURCE);
        t.finish(false);
        t.finish(true);
        let r = t.record();
        assert!(!r.complete);
        assert!(summary(&r).contains("(no output before it ended)"));
        assert!(!t.claim("late"), "a finished timeline takes no container");
    }
}
