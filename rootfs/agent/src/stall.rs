//! Reports a libcontainer call that takes long: every [`STALL_AFTER`] until it returns, the
//! agent logs every user process of the guest (parent, state, user/system CPU ticks, page
//! faults, wait channel, current syscall), so a pod's console log tells a stuck container
//! process (asleep on a wait channel, its ticks still) from a slow one (runnable, its ticks
//! and faults growing) instead of only an RPC timeout on the host.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often the process table is logged while a create or exec runs (one takes
/// milliseconds on real hardware, seconds on an emulated guest kernel, and tens of seconds
/// there when many guests share the host's cores).
const STALL_AFTER: Duration = Duration::from_secs(20);

/// The calls being watched, by a sequence number: what each is and when it began. One
/// watchdog thread (started with the first watch) serves them all, so a watch costs no
/// thread of its own (a thread is costly where the guest kernel is emulated).
/// The last sequence number given, and the calls being watched by sequence number.
type Calls = (u64, HashMap<u64, (String, Instant)>);

#[derive(Default)]
struct Watched {
    calls: Mutex<Calls>,
    changed: Condvar,
}

fn watched() -> &'static Watched {
    static WATCHED: OnceLock<Watched> = OnceLock::new();
    WATCHED.get_or_init(|| {
        if let Err(err) = crate::stream::spawn_small("stall-watch".into(), watchdog) {
            log::warn!("no stall watchdog: {err}");
        }
        Watched::default()
    })
}

fn watchdog() {
    let w = watched();
    let mut calls = w.calls.lock().unwrap_or_else(|e| e.into_inner());
    // When each call was last reported.
    let mut reported: HashMap<u64, Instant> = HashMap::new();
    loop {
        let now = Instant::now();
        reported.retain(|seq, _| calls.1.contains_key(seq));
        let mut next = STALL_AFTER;
        let mut stalled = Vec::new();
        for (seq, (what, began)) in &calls.1 {
            let since = reported.get(seq).copied().unwrap_or(*began);
            let due = since + STALL_AFTER;
            if due <= now {
                stalled.push((*seq, what.clone(), now.duration_since(*began)));
            } else {
                next = next.min(due - now);
            }
        }
        if !stalled.is_empty() {
            drop(calls);
            let table = process_table();
            for (seq, what, waited) in stalled {
                log::warn!(
                    "{what}: still running after {}s; processes:{table}",
                    waited.as_secs()
                );
                reported.insert(seq, Instant::now());
            }
            calls = w.calls.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        calls = w
            .changed
            .wait_timeout(calls, next)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Starts the watchdog thread now (at start-up: a template VM is saved with it).
pub fn start() {
    watched();
}

/// Logs the process table every [`STALL_AFTER`] until dropped.
pub struct StallWatch {
    seq: u64,
}

impl Drop for StallWatch {
    fn drop(&mut self) {
        let w = watched();
        w.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .remove(&self.seq);
    }
}

/// Starts watching `what` (e.g. "create c1").
pub fn watch(what: String) -> StallWatch {
    let w = watched();
    let mut calls = w.calls.lock().unwrap_or_else(|e| e.into_inner());
    calls.0 += 1;
    let seq = calls.0;
    calls.1.insert(seq, (what, Instant::now()));
    w.changed.notify_all();
    StallWatch { seq }
}

/// One line per user process (kernel threads, which have no command line, are skipped).
pub fn process_table() -> String {
    let mut out = String::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let mut pids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let read =
            |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
        if read("cmdline").is_empty() {
            continue;
        }
        let stat = read("stat");
        // After the name: state (field 3 of stat), ppid (4), minflt (10), majflt (12),
        // utime (14) and stime (15), in clock ticks.
        let (comm, fields) = crate::cost::stat_fields(&stat).unwrap_or(("?", Vec::new()));
        let field = |n: usize| fields.get(n - 3).copied().unwrap_or("?");
        let (state, ppid) = (field(3), field(4));
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.count())
            .unwrap_or(0);
        out += &format!(
            "\n  pid {pid} ppid {ppid} {comm} {state} threads {threads} user {} sys {} ticks, \
             faults {}+{} major, wchan {} syscall {}",
            field(14),
            field(15),
            field(10),
            field(12),
            read("wchan"),
            read("syscall").split(' ').next().unwrap_or("").trim()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_come_and_go_without_a_thread_each() {
        let a = watch("create a".into());
        let b = watch("create b".into());
        assert_ne!(a.seq, b.seq);
        assert!(watched().calls.lock().unwrap().1.len() >= 2);
        let (sa, sb) = (a.seq, b.seq);
        drop(a);
        drop(b);
        let calls = watched().calls.lock().unwrap();
        assert!(!calls.1.contains_key(&sa) && !calls.1.contains_key(&sb));
    }

    #[test]
    fn process_table_lists_this_process() {
        let table = process_table();
        let me = format!("pid {} ppid", std::process::id());
        assert!(table.contains(&me), "{table}");
    }
}
