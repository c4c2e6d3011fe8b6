//! Processes in `/proc`: command lines, shims of a containerd, descendants, signals, and
//! thread dumps for failure messages (the tests' and the benches' one copy).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// Arguments of a process (`/proc/PID/cmdline`), empty when it is gone.
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Every numeric entry of `/proc`.
pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// The value after flag `name` (`-id`, `-address`) in a shim's arguments.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Whether `args` are those of the long-running shim `binary` (file name) serving pod
/// `id` (any pod when `None`) for the containerd at `address`.
pub fn is_shim(args: &[String], binary: &str, id: Option<&str>, address: &Path) -> bool {
    let address = address.to_string_lossy();
    args.first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == binary)
        && !args.iter().any(|a| a == "start" || a == "delete")
        && flag(args, "-address") == Some(&address)
        && id.is_none_or(|id| flag(args, "-id") == Some(id))
}

/// PIDs of shims (`binary`) for the containerd at `address`, of pod `id` or of any pod.
pub fn shim_pids(binary: &str, id: Option<&str>, address: &Path) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&pid| is_shim(&cmdline(pid), binary, id, address))
        .collect()
}

/// PIDs of every process running `binary` (file name) with `sock` among its arguments: the
/// long-running shims of that containerd and any `start`/`delete` invocation in flight.
pub fn processes_of(binary: &str, sock: &Path) -> Vec<u32> {
    let sock = sock.to_string_lossy();
    all_pids()
        .into_iter()
        .filter(|&pid| {
            let args = cmdline(pid);
            args.first()
                .and_then(|a| Path::new(a).file_name())
                .is_some_and(|n| n == binary)
                && args.iter().any(|a| *a == sock)
        })
        .collect()
}

/// The parent PID field of `/proc/PID/stat` text (after the parenthesised command name,
/// which may itself hold spaces and parentheses).
pub fn parse_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `pid`'s descendants (children, grandchildren, ...), from one scan of `/proc`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for p in all_pids() {
        if let Some(ppid) = std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| parse_ppid(&s))
        {
            children.entry(ppid).or_default().push(p);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            out.push(c);
            todo.push(c);
        }
    }
    out.sort_unstable();
    out
}

/// Sends `signal` to `pid`.
pub fn kill(pid: u32, signal: i32) {
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory effects; a stale PID at worst gets ESRCH.
    unsafe { libc::kill(pid, signal) };
}

/// Makes the child get SIGKILL when its parent dies without tearing down (SIGKILL, crash),
/// so that no containerd or `ctr` client outlives a harness. (Shims that containerd started
/// are not children of the harness; they stay until their containerd's state dir is
/// cleaned.)
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A process's command line and its threads (`podvisor_shim::thread_states`), for failure
/// messages.
pub fn process_threads(pid: u32) -> String {
    format!(
        "pid {pid}: {}{}",
        cmdline(pid).join(" "),
        podvisor_shim::thread_states(Some(pid))
    )
}

/// [`process_threads`] of every descendant of this process (containerd is the subreaper
/// of its shims, so they are below it), one block each.
pub fn descendant_threads() -> String {
    descendants(std::process::id())
        .into_iter()
        .map(|p| format!("\n{}", process_threads(p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_shims_by_id_and_address() {
        let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let sock = Path::new("/tmp/x/containerd.sock");
        let shim = args("/usr/bin/containerd-shim-runc-v2 -namespace default -id p1 -address /tmp/x/containerd.sock");
        assert!(is_shim(&shim, "containerd-shim-runc-v2", Some("p1"), sock));
        assert!(is_shim(&shim, "containerd-shim-runc-v2", None, sock));
        assert!(!is_shim(&shim, "containerd-shim-runc-v2", Some("p2"), sock));
        assert!(!is_shim(&shim, "containerd-shim-podvisor-v2", None, sock));
        assert!(!is_shim(
            &shim,
            "containerd-shim-runc-v2",
            None,
            Path::new("/run/containerd/containerd.sock")
        ));
        let start = args("/usr/bin/containerd-shim-runc-v2 -namespace default -id p1 -address /tmp/x/containerd.sock start");
        assert!(!is_shim(&start, "containerd-shim-runc-v2", None, sock));
    }

    #[test]
    fn ppid_and_descendants() {
        assert_eq!(parse_ppid("42 (a) b) S 7 42 42 0"), Some(7));
        assert_eq!(parse_ppid("garbage"), None);
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let found = descendants(std::process::id()).contains(&child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found);
    }
}
