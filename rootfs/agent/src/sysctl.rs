//! The pod's kernel parameters (CRI's pod `sysctls`), written under `/proc/sys` by
//! CreateSandbox before any container runs.
//!
//! The VM is the pod's kernel: the IPC sysctls (`kernel.shm*`, `kernel.msg*`, `kernel.sem`,
//! `fs.mqueue.*`) and network sysctls (`net.*`) a pod sets for its namespaces are the VM's.
//! Rules: a name is `a.b.c` (dots become slashes) or `a/b/c` (taken as is, for names
//! whose parts hold dots, such as `net/ipv4/conf/eth0.100/forwarding`); each part is
//! non-empty, not `.` or `..`, and made of `[A-Za-z0-9_.-]` (the dotted form: no dot in a
//! part). So a name cannot leave `/proc/sys`. Parameters are written in name order; the
//! first failure stops, naming the parameter (an unknown one: the guest kernel lacks it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Errors of setting a pod's sysctls.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("sysctl name {0:?} is not a kernel parameter name (a.b.c or a/b/c of [A-Za-z0-9_.-])")]
    BadName(String),
    #[error("sysctl {name}: the guest kernel has no {path}: this kernel parameter does not exist in the pod's VM")]
    Unknown { name: String, path: PathBuf },
    #[error("sysctl {name} = {value:?}: writing {path}: {source}")]
    Write {
        name: String,
        value: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The path of parameter `name` relative to `/proc/sys`.
pub fn relative_path(name: &str) -> Result<PathBuf, SysctlError> {
    let bad = || SysctlError::BadName(name.to_string());
    let slashed = name.contains('/');
    let parts: Vec<&str> = if slashed {
        name.split('/').collect()
    } else {
        name.split('.').collect()
    };
    let part_ok = |p: &&str| {
        !p.is_empty()
            && *p != "."
            && *p != ".."
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    };
    if name.len() > 255 || !parts.iter().all(part_ok) {
        return Err(bad());
    }
    Ok(parts.iter().collect())
}

/// Writes each of `sysctls` under `proc_sys` (the guest's `/proc/sys`).
pub fn apply(proc_sys: &Path, sysctls: &HashMap<String, String>) -> Result<(), SysctlError> {
    let mut names: Vec<&String> = sysctls.keys().collect();
    names.sort();
    let planned = names
        .iter()
        .map(|name| Ok((*name, proc_sys.join(relative_path(name)?))))
        .collect::<Result<Vec<_>, SysctlError>>()?;
    for (name, path) in planned {
        let value = &sysctls[name];
        if !path.is_file() {
            return Err(SysctlError::Unknown {
                name: name.clone(),
                path,
            });
        }
        std::fs::write(&path, value).map_err(|source| SysctlError::Write {
            name: name.clone(),
            value: value.clone(),
            path: path.clone(),
            source,
        })?;
        log::debug!("sysctl {name} = {value}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_paths_under_proc_sys() {
        for (name, path) in [
            ("kernel.shm_rmid_forced", "kernel/shm_rmid_forced"),
            ("fs.mqueue.msg_max", "fs/mqueue/msg_max"),
            (
                "net/ipv4/conf/eth0.100/forwarding",
                "net/ipv4/conf/eth0.100/forwarding",
            ),
            (
                "net.ipv4.ip_unprivileged_port_start",
                "net/ipv4/ip_unprivileged_port_start",
            ),
        ] {
            assert_eq!(relative_path(name).unwrap(), PathBuf::from(path), "{name}");
        }
        for bad in [
            "",
            "kernel..x",
            ".kernel",
            "kernel.",
            "../../etc/passwd",
            "net/../../x",
            "net/./x",
            "/abs",
            "kernel.a b",
            "kernel.x\n",
        ] {
            assert!(
                matches!(relative_path(bad), Err(SysctlError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn writes_known_parameters_and_names_a_missing_one() {
        let dir = std::env::temp_dir().join(format!("sysctl-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kernel")).unwrap();
        std::fs::write(dir.join("kernel/shm_rmid_forced"), "0\n").unwrap();
        let set = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            apply(&dir, &map)
        };
        set(&[("kernel.shm_rmid_forced", "1")]).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("kernel/shm_rmid_forced")).unwrap(),
            "1"
        );
        let err = set(&[("fs.mqueue.msg_max", "100")]).unwrap_err();
        assert!(matches!(err, SysctlError::Unknown { .. }), "{err}");
        assert!(err.to_string().contains("fs.mqueue.msg_max"), "{err}");
        // A bad name anywhere: nothing is written.
        std::fs::write(dir.join("kernel/shm_rmid_forced"), "0").unwrap();
        let err = set(&[("kernel.shm_rmid_forced", "1"), ("../x", "1")]).unwrap_err();
        assert!(matches!(err, SysctlError::BadName(_)), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.join("kernel/shm_rmid_forced")).unwrap(),
            "0"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
