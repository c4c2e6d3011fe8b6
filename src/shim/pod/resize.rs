//! Resizing a running pod's memory: what its containers' memory limits add up to, the VM
//! size that follows, and the balloon that takes the guest there.
//!
//! The VM is built at its full size ([`crate::sizing`]). Guest RAM cannot grow after that,
//! so a pod's memory moves between a floor and that boot size:
//! * wanted = [`SizingRules::vm_mem_mib`] of the sum of the workload containers' limits
//!   (limits + guest overhead, rounded up to the step), at most the boot size;
//! * only while every workload container has a limit: a container without one, or no
//!   container at all (a pod being set up), leaves the VM at its boot size;
//! * the balloon holds boot − wanted: the guest driver allocates that memory, hands it to
//!   the host (which frees it) and takes it out of the guest's `MemTotal`.
//!
//! A pod created with its limits gets wanted = boot when its containers are created: no
//! balloon work at start. An Update (CRI UpdateContainerResources, in-place pod resize)
//! that lowers a limit inflates the balloon; one that raises it deflates it, up to the boot
//! size. Asking for more than the boot size is logged and capped: the container's limit in
//! the guest still changes, the VM stays at its boot size.
//!
//! [`Resizer::apply`] waits for the guest driver to report the new size (`actual`): when
//! the kubelet lowers a pod, it lowers the pod's host cgroup limit right after the
//! containers' Updates, and the memory must be back by then. A guest that does not get
//! there in time (its containers hold the memory) fails the Update with how far it got; the
//! target stays, so the guest keeps giving memory back as it frees it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;
use vmm::BalloonControl;

use crate::sizing::SizingRules;

/// Pages of 4 KiB in a MiB.
const PAGES_PER_MIB: u64 = 256;
/// How often [`Resizer::apply`] looks at the driver's progress.
const POLL: Duration = Duration::from_millis(20);

/// A container's memory limit from its resources (absent, 0 or negative: none).
pub fn memory_limit(resources: Option<&LinuxResources>) -> Option<u64> {
    resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .and_then(|l| u64::try_from(l).ok())
        .filter(|&l| l > 0)
}

/// Why a resize did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResizeError {
    #[error(
        "the pod VM did not get to {wanted_mib} MiB in {:.0} s: its balloon holds {held_mib} \
         of the {target_mib} MiB it should (the guest's containers still use that memory); the \
         guest goes on giving memory back as it frees it: retry the update, or lower the \
         containers' usage first",
        waited.as_secs_f64()
    )]
    Timeout {
        wanted_mib: u64,
        target_mib: u64,
        held_mib: u64,
        waited: Duration,
    },
    #[error(
        "the pod VM's balloon driver is not running (a guest kernel without \
         CONFIG_VIRTIO_BALLOON?): its memory cannot be lowered to {wanted_mib} MiB"
    )]
    NoDriver { wanted_mib: u64 },
}

/// The memory plan of a pod: its boot size and its workload containers' limits.
#[derive(Debug, Clone)]
pub struct PodMemory {
    boot_mib: u64,
    rules: SizingRules,
    /// Memory limit per workload container (`None`: unlimited).
    limits: BTreeMap<String, Option<u64>>,
}

impl PodMemory {
    pub fn new(boot_mib: u64, rules: SizingRules) -> Self {
        Self {
            boot_mib,
            rules,
            limits: BTreeMap::new(),
        }
    }

    /// Container `id` has memory limit `limit` (bytes; `None`: unlimited).
    pub fn set(&mut self, id: &str, limit: Option<u64>) {
        self.limits.insert(id.to_string(), limit);
    }

    /// Container `id` is gone.
    pub fn remove(&mut self, id: &str) {
        self.limits.remove(id);
    }

    /// What the containers ask for (MiB, before the cap at the boot size); `None` when the
    /// VM stays at its boot size (a container without a limit, or none at all).
    pub fn asked_mib(&self) -> Option<u64> {
        if self.limits.is_empty() {
            return None;
        }
        let sum = self
            .limits
            .values()
            .try_fold(0u64, |sum, l| l.map(|l| sum.saturating_add(l)))?;
        Some(self.rules.vm_mem_mib(sum))
    }

    /// The size the VM should have now (MiB).
    pub fn wanted_mib(&self) -> u64 {
        self.asked_mib()
            .map_or(self.boot_mib, |asked| asked.min(self.boot_mib))
    }

    /// What the balloon should hold (MiB).
    pub fn balloon_mib(&self) -> u64 {
        self.boot_mib - self.wanted_mib()
    }
}

/// A pod's memory plan and the balloon that carries it out.
pub struct Resizer {
    pod: String,
    plan: Mutex<PodMemory>,
    balloon: Option<BalloonControl>,
    timeout: Duration,
}

impl Resizer {
    /// `balloon`: the VM's, if it has one (without, the VM keeps its boot size).
    pub fn new(
        pod: &str,
        plan: PodMemory,
        balloon: Option<BalloonControl>,
        timeout: Duration,
    ) -> Self {
        Self {
            pod: pod.to_string(),
            plan: Mutex::new(plan),
            balloon,
            timeout,
        }
    }

    fn plan(&self) -> std::sync::MutexGuard<'_, PodMemory> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a change of the plan (`f`) and brings the VM to the size it gives.
    pub fn update(&self, f: impl FnOnce(&mut PodMemory)) -> Result<(), ResizeError> {
        // One resize at a time: the lock is held while the guest follows.
        let mut plan = self.plan();
        let before = plan.balloon_mib();
        f(&mut plan);
        if let Some(asked) = plan.asked_mib().filter(|&a| a > plan.boot_mib) {
            log::warn!(
                "pod {}: its containers' limits ask for a {asked} MiB VM; it was built with \
                 {} MiB and stays at that (guest RAM cannot grow)",
                self.pod,
                plan.boot_mib
            );
        }
        let balloon_mib = plan.balloon_mib();
        if balloon_mib == before {
            return Ok(());
        }
        self.apply(plan.wanted_mib(), balloon_mib)
    }

    /// Sets the balloon's target to `balloon_mib` and waits for the driver to get there.
    fn apply(&self, wanted_mib: u64, balloon_mib: u64) -> Result<(), ResizeError> {
        let Some(balloon) = &self.balloon else {
            log::warn!(
                "pod {}: no balloon (config `balloon = false`): the VM stays at its boot size \
                 instead of {wanted_mib} MiB",
                self.pod
            );
            return Ok(());
        };
        if !balloon.driver_running() {
            return Err(ResizeError::NoDriver { wanted_mib });
        }
        let start = Instant::now();
        balloon.set_target_mib(balloon_mib);
        let target = balloon.target_pages();
        loop {
            let held = balloon.actual_pages();
            if held == target {
                log::info!(
                    "pod {}: VM memory now {wanted_mib} MiB (balloon {balloon_mib} MiB), in \
                     {:.0} ms",
                    self.pod,
                    start.elapsed().as_secs_f64() * 1000.0
                );
                return Ok(());
            }
            if start.elapsed() >= self.timeout {
                return Err(ResizeError::Timeout {
                    wanted_mib,
                    target_mib: balloon_mib,
                    held_mib: u64::from(held) / PAGES_PER_MIB,
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> SizingRules {
        SizingRules {
            default_vcpus: 1,
            max_vcpus: 4,
            default_mem_mib: 256,
            min_mem_mib: 64,
            max_mem_mib: 4096,
            guest_overhead_mib: 64,
            memory_step_mib: 128,
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_vm_stays_at_boot_size_until_every_container_has_a_limit() {
        let mut p = PodMemory::new(384, rules());
        assert_eq!(p.wanted_mib(), 384, "no container yet");
        p.set("a", Some(100 * MIB));
        p.set("b", None);
        assert_eq!(p.asked_mib(), None);
        assert_eq!(p.balloon_mib(), 0);
        p.set("b", Some(20 * MIB));
        // 120 + 64 = 184, rounded up to 256.
        assert_eq!(p.wanted_mib(), 256);
        assert_eq!(p.balloon_mib(), 128);
        p.remove("a");
        p.remove("b");
        assert_eq!(p.balloon_mib(), 0, "no container: boot size");
    }

    #[test]
    fn a_pod_created_at_its_limit_needs_no_balloon_and_cannot_grow_past_boot() {
        let r = rules();
        let boot = r.vm_mem_mib(256 * MIB);
        let mut p = PodMemory::new(boot, r);
        p.set("app", Some(256 * MIB));
        assert_eq!(p.balloon_mib(), 0);
        p.set("app", Some(128 * MIB));
        assert_eq!(p.wanted_mib(), 256);
        assert_eq!(p.balloon_mib(), boot - 256);
        p.set("app", Some(1024 * MIB));
        assert_eq!(p.asked_mib(), Some(1152));
        assert_eq!(p.wanted_mib(), boot);
        assert_eq!(p.balloon_mib(), 0);
    }

    #[test]
    fn huge_limits_saturate() {
        let mut p = PodMemory::new(512, rules());
        p.set("a", Some(u64::MAX));
        p.set("b", Some(u64::MAX));
        assert_eq!(p.wanted_mib(), 512);
    }

    #[test]
    fn limits_come_from_the_oci_resources() {
        let json = |v: &str| serde_json::from_str::<LinuxResources>(v).unwrap();
        assert_eq!(
            memory_limit(Some(&json(r#"{"memory":{"limit":268435456}}"#))),
            Some(256 * MIB)
        );
        assert_eq!(
            memory_limit(Some(&json(r#"{"memory":{"limit":-1}}"#))),
            None
        );
        assert_eq!(memory_limit(Some(&json(r#"{"memory":{"limit":0}}"#))), None);
        assert_eq!(memory_limit(Some(&json(r#"{"cpu":{"shares":2}}"#))), None);
        assert_eq!(memory_limit(None), None);
    }

    #[test]
    fn without_a_balloon_a_resize_leaves_the_vm_as_built() {
        let r = Resizer::new(
            "p",
            PodMemory::new(384, rules()),
            None,
            Duration::from_secs(1),
        );
        r.update(|p| p.set("a", Some(64 * MIB))).unwrap();
    }
}
