//! What one container operation cost the whole guest: wall time, page faults, processes
//! created, context switches and the guest kernel's and user space's CPU time, from the
//! guest's own counters (`/proc/vmstat`, `/proc/stat`) read before and after. At debug
//! level the agent logs it for every CreateContainer, StartContainer and ExecProcess (and
//! who paid for a create: the agent thread, libcontainer's intermediate process, the new
//! process): on a host where the guest kernel is slow these numbers say which kernel work
//! a start pays for, and on any host they show a slow operation's kind (faulting, forking,
//! waiting). Off at the default level: reading the counters costs guest kernel time too.
//!
//! The counters are guest-wide: whatever else runs meanwhile (another container) is
//! counted too.

use std::fmt;
use std::time::Instant;

/// The guest's counters at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Counters {
    at: Instant,
    /// `pgfault` of `/proc/vmstat` (minor and major).
    page_faults: u64,
    /// `processes` of `/proc/stat`: forks and clones since boot (threads too).
    forks: u64,
    /// `ctxt` of `/proc/stat`.
    context_switches: u64,
    /// User (+nice) and system (+irq, softirq) ticks of the `cpu` line.
    user_ticks: u64,
    system_ticks: u64,
}

/// What happened between two [`Counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    pub ms: u64,
    pub page_faults: u64,
    pub forks: u64,
    pub context_switches: u64,
    pub user_ms: u64,
    pub system_ms: u64,
}

/// The field `key` of `/proc/vmstat`-style text (`key value` lines).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// (user + nice, system + irq + softirq) ticks of `/proc/stat`'s `cpu` line.
fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    Some((at(0) + at(1), at(2) + at(5) + at(6)))
}

impl Counters {
    /// Parses the counters out of `/proc/vmstat` and `/proc/stat` text.
    pub fn parse(at: Instant, vmstat: &str, stat: &str) -> Counters {
        let (user_ticks, system_ticks) = cpu_ticks(stat).unwrap_or_default();
        Counters {
            at,
            page_faults: keyed(vmstat, "pgfault").unwrap_or(0),
            forks: keyed(stat, "processes").unwrap_or(0),
            context_switches: keyed(stat, "ctxt").unwrap_or(0),
            user_ticks,
            system_ticks,
        }
    }

    /// The guest's counters now (zeros for what cannot be read).
    pub fn now() -> Counters {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Counters::parse(Instant::now(), &read("/proc/vmstat"), &read("/proc/stat"))
    }

    /// What happened since `earlier`, with `ticks_per_sec` clock ticks a second.
    pub fn since(&self, earlier: &Counters, ticks_per_sec: u64) -> Cost {
        let ms = |t: u64| t * 1000 / ticks_per_sec.max(1);
        Cost {
            ms: u64::try_from(self.at.saturating_duration_since(earlier.at).as_millis())
                .unwrap_or(u64::MAX),
            page_faults: self.page_faults.saturating_sub(earlier.page_faults),
            forks: self.forks.saturating_sub(earlier.forks),
            context_switches: self
                .context_switches
                .saturating_sub(earlier.context_switches),
            user_ms: ms(self.user_ticks.saturating_sub(earlier.user_ticks)),
            system_ms: ms(self.system_ticks.saturating_sub(earlier.system_ticks)),
        }
    }
}

/// Clock ticks a second (`sysconf(_SC_CLK_TCK)`, 100 if unknown).
pub fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// Measures one operation: `Meter::start()` before, `finish()` after.
pub struct Meter(Counters);

impl Meter {
    pub fn start() -> Meter {
        Meter(Counters::now())
    }

    pub fn finish(&self) -> Cost {
        Counters::now().since(&self.0, ticks_per_sec())
    }
}

impl fmt::Display for Cost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ms; guest: {} page faults, {} forks, {} context switches, CPU {} ms kernel + {} ms user",
            self.ms,
            self.page_faults,
            self.forks,
            self.context_switches,
            self.system_ms,
            self.user_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMSTAT: &str = "nr_free_pages 1000\npgfault 5000\npgmajfault 3\n";
    const STAT: &str = "cpu  10 2 30 400 5 6 7 0 0 0\ncpu0 10 2 30 400 5 6 7 0 0 0\nintr 1\nctxt 900\nbtime 1\nprocesses 42\n";

    #[test]
    fn counters_come_from_vmstat_and_stat() {
        let t0 = Instant::now();
        let a = Counters::parse(t0, VMSTAT, STAT);
        assert_eq!(
            (
                a.page_faults,
                a.forks,
                a.context_switches,
                a.user_ticks,
                a.system_ticks
            ),
            (5000, 42, 900, 12, 43)
        );
        let b = Counters::parse(
            t0 + std::time::Duration::from_millis(250),
            "pgfault 5600\n",
            "cpu  20 2 80 400 5 6 7\nctxt 1000\nprocesses 45\n",
        );
        assert_eq!(
            b.since(&a, 100),
            Cost {
                ms: 250,
                page_faults: 600,
                forks: 3,
                context_switches: 100,
                user_ms: 100,
                system_ms: 500,
            }
        );
        let text = b.since(&a, 100).to_string();
        assert!(
            text.starts_with("250 ms; guest: 600 page faults, 3 forks"),
            "{text}"
        );
    }

    #[test]
    fn unreadable_counters_are_zero_and_never_go_negative() {
        let t0 = Instant::now();
        let a = Counters::parse(t0, VMSTAT, STAT);
        let b = Counters::parse(t0, "", "");
        assert_eq!(b.since(&a, 100).page_faults, 0);
        assert_eq!(b.since(&a, 100).forks, 0);
    }
}

/// The command name of a `/proc/<pid>/stat` line and the fields after it (the first is
/// field 3, the state): the name may hold spaces and parentheses, so it ends at the last
/// ") ".
pub fn stat_fields(stat: &str) -> Option<(&str, Vec<&str>)> {
    let (open, close) = (stat.find('(')?, stat.rfind(") ")?);
    (open < close).then(|| {
        (
            &stat[open + 1..close],
            stat[close + 2..].split(' ').collect(),
        )
    })
}

/// CPU time (user + system) and page faults of one process or thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_ms: u64,
    pub faults: u64,
}

impl Usage {
    fn of_rusage(r: &libc::rusage) -> Usage {
        let ms = |t: libc::timeval| {
            t.tv_sec.max(0).cast_unsigned() * 1000 + t.tv_usec.max(0).cast_unsigned() / 1000
        };
        Usage {
            cpu_ms: ms(r.ru_utime) + ms(r.ru_stime),
            faults: (r.ru_minflt + r.ru_majflt).max(0).cast_unsigned(),
        }
    }

    /// `getrusage(who)`: the calling thread, or the reaped children.
    pub fn rusage(who: libc::c_int) -> Usage {
        // SAFETY: a zeroed rusage is valid; getrusage fills it.
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `r` is a valid, writable rusage for the call.
        if unsafe { libc::getrusage(who, &mut r) } != 0 {
            return Usage::default();
        }
        Usage::of_rusage(&r)
    }

    /// Process `pid`'s usage so far, from `/proc/<pid>/stat` (clock-tick resolution).
    pub fn of_pid(pid: i32) -> Usage {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        Usage::parse_stat(&stat, ticks_per_sec())
    }

    /// minflt (field 10) + majflt (12) and utime (14) + stime (15) of a stat line.
    fn parse_stat(stat: &str, ticks_per_sec: u64) -> Usage {
        let Some((_, fields)) = stat_fields(stat) else {
            return Usage::default();
        };
        let at = |field: usize| {
            fields
                .get(field - 3)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Usage {
            cpu_ms: (at(14) + at(15)) * 1000 / ticks_per_sec.max(1),
            faults: at(10) + at(12),
        }
    }

    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            cpu_ms: self.cpu_ms.saturating_sub(earlier.cpu_ms),
            faults: self.faults.saturating_sub(earlier.faults),
        }
    }
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ms CPU, {} faults", self.cpu_ms, self.faults)
    }
}

/// Who paid for one process creation: the calling agent thread, the children it reaped
/// meanwhile (libcontainer's intermediate process) and the new process itself.
pub struct SpawnMeter {
    thread: Usage,
    children: Usage,
}

impl SpawnMeter {
    pub fn start() -> SpawnMeter {
        SpawnMeter {
            thread: Usage::rusage(libc::RUSAGE_THREAD),
            children: Usage::rusage(libc::RUSAGE_CHILDREN),
        }
    }

    /// "agent thread …; intermediate …; new process …" for the process `pid` just made.
    pub fn finish(&self, pid: i32) -> String {
        format!(
            "agent thread {}; reaped children {}; new process {}",
            Usage::rusage(libc::RUSAGE_THREAD).since(&self.thread),
            Usage::rusage(libc::RUSAGE_CHILDREN).since(&self.children),
            Usage::of_pid(pid)
        )
    }
}

#[cfg(test)]
mod usage_tests {
    use super::*;

    #[test]
    fn stat_lines_give_cpu_and_faults_even_with_odd_names() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime
        let stat = "42 (a) b) (c) S 1 42 42 0 -1 4194560 250 0 3 0 12 30 0 0 20 0";
        assert_eq!(
            Usage::parse_stat(stat, 100),
            Usage {
                cpu_ms: 420,
                faults: 253
            }
        );
        assert_eq!(Usage::parse_stat("garbage", 100), Usage::default());
    }

    #[test]
    fn this_thread_has_usage() {
        let a = Usage::rusage(libc::RUSAGE_THREAD);
        let v: Vec<u8> = std::iter::repeat_n(7u8, 1 << 20).collect();
        assert_eq!(v.len(), 1 << 20);
        let b = Usage::rusage(libc::RUSAGE_THREAD);
        assert!(b.faults >= a.faults);
        assert!(Usage::of_pid(std::process::id().cast_signed()).faults > 0);
    }
}
