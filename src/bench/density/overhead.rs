//! The RuntimeClass `overhead.podFixed` a density run justifies: what a podvisor pod uses
//! on the host beyond its containers' own limits, which the kubelet adds to the pod's
//! requests (scheduling) and to its pod cgroup's limits (where the whole VM is charged).
//!
//! Memory: the shim can use its VM's RAM plus its own (VMM, shim) memory. The VM is sized
//! as the containers' limits + `guest_overhead_mib`, rounded up to `memory_step_mib`
//! (`podvisor_shim` sizing), so beyond the limits a pod can use at most
//! `guest_overhead_mib` + `memory_step_mib` − 1 + the VMM's own PSS (the run's maximum).
//! The guest's own use is measured too (VM memory − `MemAvailable` in a pod with an idle
//! container): above `guest_overhead_mib`, that setting is too small.
//!
//! CPU: the shim's CPU time (every thread: vCPUs, event loop, workers) over the settle
//! period of the idle pods, per pod, rounded up to 10 millicores. Start-up CPU (the boot)
//! is a burst and not in it.

use std::fmt::Write as _;

use super::report::Report;

/// What a run justifies, and from what.
#[derive(Debug, Clone, PartialEq)]
pub struct PodFixed {
    pub memory_mib: u64,
    pub cpu_millicores: Option<u64>,
    /// The largest VMM + shim PSS outside guest RAM among the podvisor pods, MiB.
    pub vmm_mib: f64,
    /// VM memory − `MemAvailable` in the guest, MiB (if measured).
    pub guest_own_mib: Option<f64>,
    pub guest_overhead_mib: u64,
    pub memory_step_mib: u64,
    /// Idle CPU per pod, millicores (if measured).
    pub idle_millicores: Option<f64>,
}

/// The podFixed of `report`'s podvisor run (none without one with measured pods).
pub fn pod_fixed(report: &Report) -> Option<PodFixed> {
    let run = report
        .runs
        .iter()
        .find(|r| r.runtime.starts_with("podvisor") && r.summary.ok > 0)?;
    let vmm_mib = run.summary.overhead_pss_kib.max? / 1024.0;
    let c = &report.config;
    let guest_own_mib = run
        .guest_available_kib
        .map(|avail| c.mem_mib as f64 - avail as f64 / 1024.0);
    let memory_mib = ceil_u64(vmm_mib) + c.guest_overhead_mib + c.memory_step_mib.saturating_sub(1);
    let cpu_millicores = run
        .idle_cpu_millicores
        .map(|m| ceil_u64(m / 10.0).max(1) * 10);
    Some(PodFixed {
        memory_mib,
        cpu_millicores,
        vmm_mib,
        guest_own_mib,
        guest_overhead_mib: c.guest_overhead_mib,
        memory_step_mib: c.memory_step_mib,
        idle_millicores: run.idle_cpu_millicores,
    })
}

/// `v` rounded up to a whole number (0 for negative or NaN, saturating).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn ceil_u64(v: f64) -> u64 {
    // `as` saturates (and maps NaN to 0): a measured size or rate is never out of range.
    v.ceil() as u64
}

/// The advice as Markdown, with the RuntimeClass snippet.
pub fn markdown(p: &PodFixed) -> String {
    let mut out = String::from("\n## RuntimeClass overhead this run justifies\n\n");
    let _ = writeln!(
        out,
        "memory {} Mi = VMM + shim outside guest RAM (max {:.1} MiB, rounded up) + \
         guest_overhead_mib ({} MiB) + memory_step_mib − 1 ({} MiB: VM sizes are rounded up \
         to the step). The guest's own use, measured: {}.",
        p.memory_mib,
        p.vmm_mib,
        p.guest_overhead_mib,
        p.memory_step_mib.saturating_sub(1),
        match p.guest_own_mib {
            Some(g) if g > p.guest_overhead_mib as f64 => format!(
                "{g:.0} MiB, MORE than guest_overhead_mib: raise it to at least {:.0}",
                g.ceil()
            ),
            Some(g) => format!("{g:.0} MiB (within guest_overhead_mib)"),
            None => "not measured".into(),
        }
    );
    match (p.cpu_millicores, p.idle_millicores) {
        (Some(m), Some(idle)) => {
            let _ = writeln!(
                out,
                "\ncpu {m}m = the idle pod's CPU ({idle:.1} millicores per pod over the settle \
                 period, every shim thread), rounded up to 10m; the boot is a burst on top."
            );
        }
        _ => out += "\ncpu: not measured (no settle period with podvisor pods).\n",
    }
    out += "\n```yaml\napiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: podvisor\nhandler: podvisor\noverhead:\n  podFixed:\n";
    let _ = writeln!(out, "    memory: \"{}Mi\"", p.memory_mib);
    if let Some(m) = p.cpu_millicores {
        let _ = writeln!(out, "    cpu: \"{m}m\"");
    }
    out += "```\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::density::report::tests::sample;

    #[test]
    fn memory_is_vmm_plus_guest_overhead_plus_rounding_and_cpu_rounds_up() {
        let mut r = sample();
        r.config.mem_mib = 256;
        r.config.guest_overhead_mib = 64;
        r.config.memory_step_mib = 128;
        r.runs[1].guest_available_kib = Some(200 * 1024);
        r.runs[1].idle_cpu_millicores = Some(3.2);
        let p = pod_fixed(&r).unwrap();
        // The sample's podvisor pods have 3 MiB of overhead.
        assert_eq!(p.vmm_mib, 3.0);
        assert_eq!(p.memory_mib, 3 + 64 + 127);
        assert_eq!(p.cpu_millicores, Some(10));
        assert_eq!(p.guest_own_mib, Some(56.0));
        let md = markdown(&p);
        assert!(md.contains("memory: \"194Mi\""), "{md}");
        assert!(md.contains("cpu: \"10m\""), "{md}");
        assert!(md.contains("56 MiB (within guest_overhead_mib)"), "{md}");

        r.runs[1].guest_available_kib = Some(150 * 1024);
        r.runs[1].idle_cpu_millicores = Some(25.0);
        let p = pod_fixed(&r).unwrap();
        assert_eq!(p.cpu_millicores, Some(30));
        assert!(markdown(&p)
            .contains("106 MiB, MORE than guest_overhead_mib: raise it to at least 106"));
    }

    #[test]
    fn no_podvisor_run_no_advice() {
        let mut r = sample();
        r.runs.truncate(1);
        assert_eq!(pod_fixed(&r), None);
    }
}
