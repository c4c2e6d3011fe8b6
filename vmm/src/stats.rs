//! What a running VM has cost so far, for start timelines: KVM exits by kind (each one a
//! trip through KVM and, for I/O, this process) and the vCPU threads' CPU time. The vCPU
//! threads count with relaxed atomic adds; anyone reads a [`VmStats`] through a
//! [`VmStatsHandle`] at any time.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

/// One VM's counters, shared by its vCPU threads.
#[derive(Debug, Default)]
pub(crate) struct VmCounters {
    port_io: AtomicU64,
    mmio: AtomicU64,
    interrupted: AtomicU64,
    other: AtomicU64,
    /// Thread ids of the vCPU threads (0 until a thread starts).
    vcpu_tids: Vec<AtomicI32>,
}

/// Which kind of exit a vCPU took.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ExitKind {
    PortIo,
    Mmio,
    /// A signal (pause, stop) or an interrupt window.
    Interrupted,
    Other,
}

impl VmCounters {
    pub fn new(vcpus: usize) -> Self {
        Self {
            vcpu_tids: (0..vcpus).map(|_| AtomicI32::new(0)).collect(),
            ..Self::default()
        }
    }

    pub fn count(&self, kind: ExitKind) {
        let c = match kind {
            ExitKind::PortIo => &self.port_io,
            ExitKind::Mmio => &self.mmio,
            ExitKind::Interrupted => &self.interrupted,
            ExitKind::Other => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The vCPU threads' ids, by vCPU (0 for a thread not started yet).
    pub fn vcpu_thread_ids(&self) -> Vec<i32> {
        self.vcpu_tids
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .collect()
    }

    /// vCPU `id`'s thread is the calling thread.
    pub fn register_vcpu_thread(&self, id: usize) {
        if let Some(slot) = self.vcpu_tids.get(id) {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            slot.store(tid, Ordering::Relaxed);
        }
    }
}

/// A VM's costs so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmStats {
    /// Exits for port I/O (the UART, the i8042, PCI probes).
    pub exits_port_io: u64,
    /// Exits for MMIO (virtio-mmio registers not handled by an ioeventfd, the boot timer).
    pub exits_mmio: u64,
    /// `KVM_RUN` returns for signals and interrupt windows.
    pub exits_interrupted: u64,
    /// Every other exit.
    pub exits_other: u64,
    /// CPU time of the vCPU threads (guest and the exits' handling), ns.
    pub vcpu_cpu_ns: u64,
}

impl VmStats {
    /// What happened between `earlier` and this reading.
    pub fn since(&self, earlier: &VmStats) -> VmStats {
        VmStats {
            exits_port_io: self.exits_port_io.saturating_sub(earlier.exits_port_io),
            exits_mmio: self.exits_mmio.saturating_sub(earlier.exits_mmio),
            exits_interrupted: self
                .exits_interrupted
                .saturating_sub(earlier.exits_interrupted),
            exits_other: self.exits_other.saturating_sub(earlier.exits_other),
            vcpu_cpu_ns: self.vcpu_cpu_ns.saturating_sub(earlier.vcpu_cpu_ns),
        }
    }

    /// All exits.
    pub fn exits(&self) -> u64 {
        self.exits_port_io + self.exits_mmio + self.exits_interrupted + self.exits_other
    }
}

/// A handle on a VM's counters, usable from any thread while the VM runs and after.
#[derive(Debug, Clone)]
pub struct VmStatsHandle(pub(crate) Arc<VmCounters>);

impl VmStatsHandle {
    /// The VM's costs so far.
    pub fn read(&self) -> VmStats {
        let c = &self.0;
        VmStats {
            exits_port_io: c.port_io.load(Ordering::Relaxed),
            exits_mmio: c.mmio.load(Ordering::Relaxed),
            exits_interrupted: c.interrupted.load(Ordering::Relaxed),
            exits_other: c.other.load(Ordering::Relaxed),
            vcpu_cpu_ns: c
                .vcpu_thread_ids()
                .into_iter()
                .filter(|&t| t > 0)
                .filter_map(thread_cpu_ns)
                .sum(),
        }
    }
}

/// CPU time of this process's thread `tid`, ns: the first field of its `schedstat`, else
/// `utime + stime` of its `stat` (in clock ticks, coarser).
fn thread_cpu_ns(tid: i32) -> Option<u64> {
    let dir = format!("/proc/self/task/{tid}");
    if let Ok(s) = std::fs::read_to_string(format!("{dir}/schedstat")) {
        if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
            return Some(ns);
        }
    }
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    Some(stat_cpu_ticks(&stat)? * 1_000_000_000 / clock_ticks_per_sec())
}

/// `utime + stime` (clock ticks) of a `/proc/<pid>/stat` or `/proc/<pid>/task/<tid>/stat`
/// line: fields 14 and 15, counted after the closing parenthesis of the command name
/// (which may hold spaces and parentheses).
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`; 100 if it says nothing usable).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf reads a constant of the system; no memory is involved.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        let stat = "1234 (containerd-shim (v2) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 9 0 100 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some(42));
        assert_eq!(stat_cpu_ticks("1 (x) S 1"), None);
    }

    #[test]
    fn counts_exits_and_reads_the_threads_cpu_time() {
        let c = Arc::new(VmCounters::new(2));
        c.count(ExitKind::PortIo);
        c.count(ExitKind::PortIo);
        c.count(ExitKind::Mmio);
        c.count(ExitKind::Interrupted);
        let before = VmStatsHandle(c.clone()).read();
        assert_eq!(before.vcpu_cpu_ns, 0, "no vCPU thread yet");
        let c2 = c.clone();
        let (burnt, done) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            c2.register_vcpu_thread(1);
            // Burn 20 ms of this thread's own CPU time (however loaded the host is), then
            // stay alive until read.
            let cpu_ns = || {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: `ts` is a valid timespec for the call.
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                u64::try_from(ts.tv_sec).unwrap() * 1_000_000_000
                    + u64::try_from(ts.tv_nsec).unwrap()
            };
            while cpu_ns() < 20_000_000 {}
            burnt.send(()).unwrap();
            let _ = stopped.recv();
        });
        done.recv().unwrap();
        c.count(ExitKind::Other);
        let after = VmStatsHandle(c).read();
        let d = after.since(&before);
        assert_eq!(
            (
                before.exits_port_io,
                before.exits_mmio,
                d.exits_other,
                after.exits()
            ),
            (2, 1, 1, 5)
        );
        assert!(d.vcpu_cpu_ns >= 10_000_000, "{d:?}");
        stop.send(()).unwrap();
    }
}
