//! Reports a libcontainer call that takes long: every [`STALL_AFTER`] until it returns, the
//! agent logs every user process of the guest (parent, state, user/system CPU ticks, page
//! faults, wait channel, current syscall), so a pod's console log tells a stuck container
//! process (asleep on a wait channel, its ticks still) from a slow one (runnable, its ticks
//! and faults growing) instead of only an RPC timeout on the host.

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::time::Duration;

/// How often the process table is logged while a create or exec runs (one takes
/// milliseconds on real hardware, seconds on an emulated guest kernel, and tens of seconds
/// there when many guests share the host's cores).
const STALL_AFTER: Duration = Duration::from_secs(20);

/// Logs the process table if dropped more than [`STALL_AFTER`] after [`watch`].
pub struct StallWatch {
    _done: Option<Sender<()>>,
}

/// Starts watching `what` (e.g. "create c1").
pub fn watch(what: String) -> StallWatch {
    let (tx, rx) = channel::<()>();
    let spawned = crate::stream::spawn_small("stall-watch".into(), move || {
        let mut waited = Duration::ZERO;
        loop {
            match rx.recv_timeout(STALL_AFTER) {
                Err(RecvTimeoutError::Timeout) => {
                    waited += STALL_AFTER;
                    log::warn!(
                        "{what}: still running after {waited:?}; processes:{}",
                        process_table()
                    );
                }
                // Sent nothing: the guard was dropped, the call returned.
                _ => return,
            }
        }
    });
    StallWatch {
        _done: spawned.ok().map(|()| tx),
    }
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
        let (comm, rest) = match (stat.find('('), stat.rfind(") ")) {
            (Some(a), Some(b)) if a < b => (&stat[a + 1..b], &stat[b + 2..]),
            _ => ("?", ""),
        };
        // After the name: state (field 3 of stat), ppid (4), minflt (10), majflt (12),
        // utime (14) and stime (15), in clock ticks.
        let fields: Vec<&str> = rest.split(' ').collect();
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
    fn process_table_lists_this_process() {
        let table = process_table();
        let me = format!("pid {} ppid", std::process::id());
        assert!(table.contains(&me), "{table}");
    }
}
