//! Guest CPUs the host resizes. The VM has more vCPUs than it boots with (the MP table lists
//! them all; the kernel's `maxcpus=` leaves the extra ones parked): SetOnlineCpus brings
//! `cpu1`.. online in ascending order until the asked count is online and takes the others
//! offline in descending order. `cpu0` is always online.
//!
//! The directory is sysfs's `/sys/devices/system/cpu` in the guest (`--cpu-dir`); an agent
//! on the host for tests has none unless given a fake one, so it never touches host CPUs.

use std::path::{Path, PathBuf};

use crate::error::{RpcError, RpcResult};

/// The CPUs in a sysfs CPU list (`0-3,5`).
pub fn parse_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 4096 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// The guest's CPUs under a sysfs CPU directory.
pub struct Cpus {
    dir: PathBuf,
}

impl Cpus {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn list(&self, name: &str) -> RpcResult<Vec<u32>> {
        let path = self.dir.join(name);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| RpcError::Internal(format!("{}: {e}", path.display())))?;
        parse_list(&text)
            .ok_or_else(|| RpcError::Internal(format!("{}: bad CPU list {text:?}", path.display())))
    }

    fn set(&self, cpu: u32, online: bool) -> RpcResult<()> {
        let path = self.dir.join(format!("cpu{cpu}/online"));
        std::fs::write(&path, if online { "1" } else { "0" }).map_err(|e| {
            RpcError::Internal(format!(
                "cannot bring cpu{cpu} {}: {}: {e}",
                if online { "online" } else { "offline" },
                path.display()
            ))
        })
    }

    /// Brings `count` CPUs online (cpu0 and up), the rest offline; returns how many are
    /// online afterwards.
    pub fn set_online(&self, count: u32) -> RpcResult<u32> {
        let possible = self.list("possible")?;
        let max = u32::try_from(possible.len()).unwrap_or(u32::MAX);
        if count == 0 || count > max {
            return Err(RpcError::InvalidArgument(format!(
                "{count} online CPUs asked; this VM has 1 to {max}"
            )));
        }
        let online = self.list("online")?;
        // `possible` is ascending: the first `count` CPUs stay or come online.
        let (wanted, rest) = possible.split_at(possible.len().min(count as usize));
        for &cpu in wanted.iter().filter(|&&c| c != 0 && !online.contains(&c)) {
            self.set(cpu, true)?;
        }
        for &cpu in rest
            .iter()
            .rev()
            .filter(|&&c| c != 0 && online.contains(&c))
        {
            self.set(cpu, false)?;
        }
        let now = self.list("online")?;
        log::info!("CPUs online: {now:?} ({count} asked)");
        Ok(u32::try_from(now.len()).unwrap_or(u32::MAX))
    }
}

/// The agent's CPU directory: none for an agent that must not change CPUs.
pub fn for_dir(dir: Option<&Path>) -> Option<Cpus> {
    dir.map(|d| Cpus::new(d.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_list("0-3,5\n"), Some(vec![0, 1, 2, 3, 5]));
        assert_eq!(parse_list("0"), Some(vec![0]));
        assert_eq!(parse_list(""), Some(vec![]));
        assert_eq!(parse_list("3-1"), None);
        assert_eq!(parse_list("0-99999"), None);
        assert_eq!(parse_list("x"), None);
    }

    /// A fake sysfs whose `online` list follows the `cpuN/online` files, as the kernel's does.
    struct FakeSysfs {
        dir: tempfile::TempDir,
        n: u32,
    }

    impl FakeSysfs {
        fn new(n: u32, online: u32) -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("possible"), format!("0-{}\n", n - 1)).unwrap();
            for c in 1..n {
                std::fs::create_dir(dir.path().join(format!("cpu{c}"))).unwrap();
                let v = if c < online { "1" } else { "0" };
                std::fs::write(dir.path().join(format!("cpu{c}/online")), v).unwrap();
            }
            let s = Self { dir, n };
            s.sync();
            s
        }

        fn sync(&self) {
            let mut on = vec!["0".to_string()];
            for c in 1..self.n {
                let f = self.dir.path().join(format!("cpu{c}/online"));
                if std::fs::read_to_string(f).unwrap().trim() == "1" {
                    on.push(c.to_string());
                }
            }
            std::fs::write(self.dir.path().join("online"), on.join(",")).unwrap();
        }
    }

    #[test]
    fn cpus_come_online_and_go_offline_to_the_asked_count() {
        let fake = FakeSysfs::new(4, 1);
        let cpus = Cpus::new(fake.dir.path().to_path_buf());
        // The fake's `online` is refreshed by hand: the first call sees 1 CPU online.
        cpus.set_online(3).unwrap();
        fake.sync();
        assert_eq!(cpus.list("online").unwrap(), vec![0, 1, 2]);
        cpus.set_online(1).unwrap();
        fake.sync();
        assert_eq!(cpus.list("online").unwrap(), vec![0]);
        assert!(matches!(
            cpus.set_online(0),
            Err(RpcError::InvalidArgument(_))
        ));
        assert!(matches!(
            cpus.set_online(5),
            Err(RpcError::InvalidArgument(_))
        ));
    }
}
