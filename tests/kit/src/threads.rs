//! The confinement of a VMM process's threads, as `/proc` shows it.

/// One thread: name, `Seccomp:` (2 = filter), `NoNewPrivs:`, `CapEff:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadConfinement {
    pub name: String,
    pub seccomp: String,
    pub no_new_privs: String,
    pub cap_eff: String,
}

/// Every thread of process `pid`.
pub fn threads(pid: u32) -> Vec<ThreadConfinement> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            let field = |name: &str| devices::confine::status_field(&status, name);
            ThreadConfinement {
                name: field("Name:"),
                seccomp: field("Seccomp:"),
                no_new_privs: field("NoNewPrivs:"),
                cap_eff: field("CapEff:"),
            }
        })
        .collect()
}

/// Checks that every thread of `pid` that handles guest-driven data (vCPUs, event loop,
/// device workers) runs under a seccomp filter with no_new_privs, and that those which need
/// no capability have none; `expect` lists name prefixes that must be present.
pub fn check_guest_threads_confined(pid: u32, expect: &[&str]) -> Result<(), String> {
    let all = threads(pid);
    for prefix in expect {
        if !all.iter().any(|t| t.name.starts_with(prefix)) {
            return Err(format!("no {prefix}* thread in {all:#?}"));
        }
    }
    for t in all.iter().filter(|t| {
        ["vcpu", "vmm-events", "fs-", "blk-io"]
            .iter()
            .any(|p| t.name.starts_with(p))
    }) {
        if (t.seccomp.as_str(), t.no_new_privs.as_str()) != ("2", "1") {
            return Err(format!("not confined: {t:?}"));
        }
        if !t.name.starts_with("fs-") && t.cap_eff != "0000000000000000" {
            return Err(format!("capabilities left: {t:?}"));
        }
    }
    Ok(())
}
