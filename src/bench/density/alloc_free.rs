//! The alloc-free scenario: does a pod give back memory its workload touched and freed?
//!
//! Each pod runs [`command`]: it prints `ready`, waits [`PAUSE_S`] seconds (the harness
//! takes the pod's baseline PSS meanwhile), touches `--alloc-mib` MiB in one buffer
//! (`dd bs=<N>M count=1` from `/dev/zero`: the read fills every page of it), exits (which
//! frees it), prints `freed` and idles. The harness samples the pod's PSS about once a
//! second while it allocates (the peak), takes it again right after `freed` and once more
//! `--reclaim-wait` seconds later.
//!
//! runc's pod gives the memory back at once (the process's exit unmaps it). A VM pod keeps
//! it as guest free memory unless the guest hands it back: podvisor's guest reports free
//! 2 MiB blocks on the balloon about 2 s after they are freed and the VMM discards them.

use std::time::{Duration, Instant};

use super::report::{AllocFreeRecord, AllocFreeRun};
use super::{check_interrupt, measure_pod, Containerd, DensityError, Plan, Pod, Pods, Runtime};

/// Seconds between `ready` and the allocation: room for the baseline measurement.
pub const PAUSE_S: u64 = 15;
/// What the pod prints once the memory is freed.
pub const FREED: &str = "freed";

/// The pod's command for an allocation of `alloc_mib` MiB.
pub fn command(alloc_mib: u64) -> [String; 3] {
    [
        "sh".into(),
        "-c".into(),
        format!(
            "echo ready; sleep {PAUSE_S}; \
             if dd if=/dev/zero of=/dev/null bs={alloc_mib}M count=1 2>/dev/null; \
             then echo {FREED}; else echo alloc-failed; fi; exec sleep 100000"
        ),
    ]
}

/// Where one pod is.
enum Stage {
    Starting,
    Allocating,
    Reclaiming { freed: Instant },
    Done,
}

/// Runs `plan.pods` alloc-free pods of `runtime` (all started at once) and measures them.
pub(super) fn run(
    plan: &Plan,
    containerd: &Containerd,
    runtime: Runtime,
) -> Result<AllocFreeRun, DensityError> {
    let cmd = command(plan.alloc_mib);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut pods = Pods {
        containerd,
        runtime,
        pods: Vec::new(),
        torn_down: false,
    };
    for index in 0..plan.pods {
        let id = format!(
            "alloc-free-{}-{}-{index}",
            std::process::id(),
            runtime.name()
        );
        pods.pods
            .push(Pod::spawn_running(containerd, runtime, id, index, 0, &cmd)?);
    }
    let mut records: Vec<AllocFreeRecord> = pods
        .pods
        .iter()
        .map(|p| AllocFreeRecord {
            id: p.id.clone(),
            ..AllocFreeRecord::default()
        })
        .collect();
    let mut stages: Vec<Stage> = pods.pods.iter().map(|_| Stage::Starting).collect();
    let measure = |pod: &Pod| -> Result<u64, String> {
        measure_pod(runtime, &pod.id, containerd.sock(), plan.mem_mib)
            .map(|m| m.overhead + m.workload)
    };
    let mut last_sample = Instant::now();
    while stages.iter().any(|s| !matches!(s, Stage::Done)) {
        check_interrupt()?;
        let mut sampled = false;
        for ((pod, stage), rec) in pods.pods.iter_mut().zip(&mut stages).zip(&mut records) {
            let next = match stage {
                Stage::Done => continue,
                Stage::Starting => {
                    if pod.poll(plan.timeout) && pod.error.is_none() {
                        rec.start_s = pod
                            .first_output()
                            .map(|t| t.duration_since(pod.spawned).as_secs_f64());
                        match measure(pod) {
                            Ok(kib) => {
                                rec.baseline_pss_kib = Some(kib);
                                Some(Stage::Allocating)
                            }
                            Err(e) => {
                                rec.error = Some(format!("baseline: {e}"));
                                Some(Stage::Done)
                            }
                        }
                    } else if let Some(e) = &pod.error {
                        rec.error = Some(e.clone());
                        Some(Stage::Done)
                    } else {
                        None
                    }
                }
                Stage::Allocating => match pod.printed(FREED) {
                    None if last_sample.elapsed() >= Duration::from_secs(1) => {
                        // The peak while the guest allocates (a VM's host memory grows
                        // as the guest touches pages).
                        if let Ok(kib) = measure(pod) {
                            rec.peak_pss_kib = Some(rec.peak_pss_kib.unwrap_or(0).max(kib));
                        }
                        sampled = true;
                        None
                    }
                    Some(freed) => {
                        let ready = pod.first_output().unwrap_or(pod.spawned);
                        rec.alloc_s =
                            Some(freed.duration_since(ready).as_secs_f64() - PAUSE_S as f64);
                        match measure(pod) {
                            Ok(kib) => {
                                rec.freed_pss_kib = Some(kib);
                                Some(Stage::Reclaiming { freed })
                            }
                            Err(e) => {
                                rec.error = Some(format!("after the free: {e}"));
                                Some(Stage::Done)
                            }
                        }
                    }
                    None if pod.printed("alloc-failed").is_some() => {
                        rec.error = Some(format!(
                            "the pod could not allocate {} MiB (give it more: --mem-mib)",
                            plan.alloc_mib
                        ));
                        Some(Stage::Done)
                    }
                    None if pod.spawned.elapsed() > plan.timeout => {
                        rec.error = Some(format!(
                            "no `{FREED}` within {} s (raise --timeout)",
                            plan.timeout.as_secs()
                        ));
                        Some(Stage::Done)
                    }
                    None => None,
                },
                Stage::Reclaiming { freed } => {
                    if freed.elapsed() >= plan.reclaim_wait {
                        match measure(pod) {
                            Ok(kib) => rec.settled_pss_kib = Some(kib),
                            Err(e) => rec.error = Some(format!("after the wait: {e}")),
                        }
                        Some(Stage::Done)
                    } else {
                        None
                    }
                }
            };
            if let Some(next) = next {
                *stage = next;
            }
        }
        if sampled {
            last_sample = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let teardown_problems = pods.teardown();
    Ok(AllocFreeRun {
        runtime: runtime.name().to_string(),
        alloc_mib: plan.alloc_mib,
        reclaim_wait_s: plan.reclaim_wait.as_secs(),
        pods: records,
        teardown_problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_touches_the_asked_size_and_says_how_it_went() {
        let [sh, c, script] = command(200);
        assert_eq!((sh.as_str(), c.as_str()), ("sh", "-c"));
        assert!(script.starts_with("echo ready; sleep 15;"), "{script}");
        assert!(script.contains("bs=200M count=1"), "{script}");
        assert!(
            script.contains("then echo freed; else echo alloc-failed;"),
            "{script}"
        );
    }
}
