//! Resizing a running pod: what its containers' limits add up to, the VM size that follows,
//! and how the VM gets there (vCPUs through the agent, memory through the balloon).
//!
//! The VM is built at its full size ([`crate::sizing`]): the pod's vCPUs online plus parked
//! ones up to `max_vcpus`, and its memory. Guest RAM cannot grow after that, so a pod's
//! memory moves between a floor and that boot size; its CPUs between 1 and the vCPUs the VM
//! has.
//! * memory wanted = [`SizingRules::vm_mem_mib`] of the sum of the workload containers'
//!   limits (limits + guest overhead, rounded up to the step), at most the boot size; the
//!   balloon holds boot − wanted (the guest driver allocates it, hands it to the host, which
//!   frees it, and takes it out of the guest's `MemTotal`);
//! * vCPUs wanted = ⌈Σ quota / period⌉ of the workload containers' CPU limits, 1 to the VM's
//!   vCPUs; the agent brings guest CPUs online (parked vCPUs start) or offline;
//! * each applies only while every workload container has that limit: a container without
//!   one, or no container at all (a pod being set up), leaves it at the boot size.
//!
//! A pod created with its limits is at the wanted size when its containers are created: no
//! resize work at start. An Update (CRI UpdateContainerResources, in-place pod resize) that
//! lowers a limit shrinks the VM; one that raises it grows the VM back, up to what it was
//! built with. Asking for more is logged and capped: the container's limit in the guest
//! still changes.
//!
//! [`Resizer::update`] waits for the guest to get there: the CPUs when the agent answers,
//! the memory when the balloon driver reports it (`actual`). When the kubelet lowers a pod,
//! it lowers the pod's host cgroup limit right after the containers' Updates, and the
//! memory must be back by then. A guest that does not get there in time (its containers
//! hold the memory) fails the Update with how far it got; the target stays, so the guest
//! keeps giving memory back as it frees it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;
use vmm::BalloonControl;

use crate::agent::{Agent, AgentError};
use crate::sizing::SizingRules;

/// How often [`Resizer::apply`] looks at the driver's progress.
const POLL: Duration = Duration::from_millis(20);

/// A container's limits that size the pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContainerLimits {
    /// Memory limit, bytes.
    pub memory_bytes: Option<u64>,
    /// CPU limit as (quota, period), µs.
    pub cpu: Option<(u64, u64)>,
}

impl ContainerLimits {
    /// From OCI resources (absent, 0 or negative values: no limit).
    pub fn of(resources: Option<&LinuxResources>) -> Self {
        let positive = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).filter(|&v| v > 0);
        let memory_bytes = positive(
            resources
                .and_then(|r| r.memory().as_ref())
                .and_then(|m| m.limit()),
        );
        let cpu = resources
            .and_then(|r| r.cpu().as_ref())
            .and_then(|c| positive(c.quota()).zip(c.period().filter(|&p| p > 0)));
        Self { memory_bytes, cpu }
    }
}

/// Why a resize did not complete.
#[derive(Debug, thiserror::Error)]
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
    #[error("cannot bring {wanted} vCPUs online in the pod VM: {source}")]
    Cpus {
        wanted: u32,
        #[source]
        source: AgentError,
    },
}

/// The size plan of a pod: its boot size and its workload containers' limits.
#[derive(Debug, Clone)]
pub struct PodSize {
    boot_mib: u64,
    boot_vcpus: u32,
    /// vCPUs the VM has (online or parked).
    vcpu_slots: u32,
    rules: SizingRules,
    limits: BTreeMap<String, ContainerLimits>,
}

impl PodSize {
    pub fn new(boot_mib: u64, boot_vcpus: u32, vcpu_slots: u32, rules: SizingRules) -> Self {
        Self {
            boot_mib,
            boot_vcpus,
            vcpu_slots: vcpu_slots.max(boot_vcpus),
            rules,
            limits: BTreeMap::new(),
        }
    }

    /// Container `id` has `limits`.
    pub fn set(&mut self, id: &str, limits: ContainerLimits) {
        self.limits.insert(id.to_string(), limits);
    }

    /// Container `id` is gone.
    pub fn remove(&mut self, id: &str) {
        self.limits.remove(id);
    }

    /// What the containers' memory limits ask for (MiB, before the cap at the boot size);
    /// `None` when the VM stays at its boot size.
    pub fn asked_mib(&self) -> Option<u64> {
        if self.limits.is_empty() {
            return None;
        }
        let sum = self
            .limits
            .values()
            .try_fold(0u64, |sum, l| l.memory_bytes.map(|m| sum.saturating_add(m)))?;
        Some(self.rules.vm_mem_mib(sum))
    }

    /// The memory the VM should have now (MiB).
    pub fn wanted_mib(&self) -> u64 {
        self.asked_mib()
            .map_or(self.boot_mib, |asked| asked.min(self.boot_mib))
    }

    /// What the balloon should hold (MiB).
    pub fn balloon_mib(&self) -> u64 {
        self.boot_mib - self.wanted_mib()
    }

    /// What the containers' CPU limits ask for (vCPUs, before the cap); `None` when the VM
    /// stays at its boot vCPUs.
    pub fn asked_vcpus(&self) -> Option<u64> {
        if self.limits.is_empty() {
            return None;
        }
        // Σ quota/period, exactly: over a common period of 1 s (quota scaled), then rounded up.
        let micros = self.limits.values().try_fold(0u128, |sum, l| {
            l.cpu.map(|(quota, period)| {
                sum + u128::from(quota) * 1_000_000 / u128::from(period.max(1))
            })
        })?;
        Some(
            u64::try_from(micros.div_ceil(1_000_000))
                .unwrap_or(u64::MAX)
                .max(1),
        )
    }

    /// The vCPUs that should be online now.
    pub fn wanted_vcpus(&self) -> u32 {
        self.asked_vcpus().map_or(self.boot_vcpus, |asked| {
            u32::try_from(asked)
                .unwrap_or(u32::MAX)
                .min(self.vcpu_slots)
        })
    }
}

/// A pod's size plan and what carries it out.
pub struct Resizer {
    pod: String,
    plan: Mutex<PodSize>,
    balloon: Option<BalloonControl>,
    timeout: Duration,
}

impl Resizer {
    /// `balloon`: the VM's, if it has one (without, the VM keeps its boot memory).
    pub fn new(
        pod: &str,
        plan: PodSize,
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

    fn plan(&self) -> std::sync::MutexGuard<'_, PodSize> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a change of the plan (`f`) and brings the VM to the size it gives: its CPUs
    /// through `agent`, its memory through the balloon.
    pub fn update(
        &self,
        agent: &dyn Agent,
        f: impl FnOnce(&mut PodSize),
    ) -> Result<(), ResizeError> {
        // One resize at a time: the lock is held while the guest follows.
        let mut plan = self.plan();
        let (balloon_before, vcpus_before) = (plan.balloon_mib(), plan.wanted_vcpus());
        f(&mut plan);
        if let Some(asked) = plan.asked_mib().filter(|&a| a > plan.boot_mib) {
            log::warn!(
                "pod {}: its containers' limits ask for a {asked} MiB VM; it was built with \
                 {} MiB and stays at that (guest RAM cannot grow)",
                self.pod,
                plan.boot_mib
            );
        }
        if let Some(asked) = plan
            .asked_vcpus()
            .filter(|&a| a > u64::from(plan.vcpu_slots))
        {
            log::warn!(
                "pod {}: its containers' CPU limits ask for {asked} vCPUs; the VM has {} \
                 (max_vcpus)",
                self.pod,
                plan.vcpu_slots
            );
        }
        let vcpus = plan.wanted_vcpus();
        if vcpus != vcpus_before {
            let start = Instant::now();
            let online = agent
                .set_online_cpus(vcpus)
                .map_err(|source| ResizeError::Cpus {
                    wanted: vcpus,
                    source,
                })?;
            log::info!(
                "pod {}: {online} vCPUs online (asked {vcpus}), in {:.0} ms",
                self.pod,
                start.elapsed().as_secs_f64() * 1000.0
            );
        }
        let balloon_mib = plan.balloon_mib();
        if balloon_mib == balloon_before {
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
                    held_mib: balloon.actual_mib(),
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
    use crate::sizing::tests::rules;

    const MIB: u64 = 1 << 20;

    fn mem(bytes: u64) -> ContainerLimits {
        ContainerLimits {
            memory_bytes: Some(bytes),
            cpu: None,
        }
    }

    fn cpu(quota: u64, period: u64) -> ContainerLimits {
        ContainerLimits {
            memory_bytes: None,
            cpu: Some((quota, period)),
        }
    }

    #[test]
    fn the_vm_stays_at_boot_size_until_every_container_has_a_limit() {
        let mut p = PodSize::new(384, 1, 1, rules());
        assert_eq!(p.wanted_mib(), 384, "no container yet");
        p.set("a", mem(100 * MIB));
        p.set("b", ContainerLimits::default());
        assert_eq!(p.asked_mib(), None);
        assert_eq!(p.balloon_mib(), 0);
        p.set("b", mem(20 * MIB));
        // 120 + 48 = 168, rounded up to 192 (64 MiB steps).
        assert_eq!(p.wanted_mib(), 192);
        assert_eq!(p.balloon_mib(), 192);
        p.remove("a");
        p.remove("b");
        assert_eq!(p.balloon_mib(), 0, "no container: boot size");
    }

    #[test]
    fn a_pod_created_at_its_limit_needs_no_balloon_and_cannot_grow_past_boot() {
        let r = rules();
        let boot = r.vm_mem_mib(256 * MIB);
        assert_eq!(boot, 320);
        let mut p = PodSize::new(boot, 1, 1, r);
        p.set("app", mem(256 * MIB));
        assert_eq!(p.balloon_mib(), 0);
        p.set("app", mem(128 * MIB));
        assert_eq!(p.wanted_mib(), 192);
        assert_eq!(p.balloon_mib(), 128);
        p.set("app", mem(1024 * MIB));
        assert_eq!(p.asked_mib(), Some(1088));
        assert_eq!(p.wanted_mib(), boot);
        assert_eq!(p.balloon_mib(), 0);
    }

    #[test]
    fn huge_limits_saturate() {
        let mut p = PodSize::new(512, 1, 1, rules());
        p.set("a", mem(u64::MAX));
        p.set("b", mem(u64::MAX));
        assert_eq!(p.wanted_mib(), 512);
    }

    #[test]
    fn vcpus_follow_the_sum_of_cpu_limits_within_the_vms_vcpus() {
        let mut p = PodSize::new(384, 2, 4, rules());
        assert_eq!(p.wanted_vcpus(), 2, "no container yet");
        p.set("a", cpu(50_000, 100_000));
        assert_eq!(p.wanted_vcpus(), 1);
        p.set("b", ContainerLimits::default());
        assert_eq!(p.wanted_vcpus(), 2, "a container without a CPU limit");
        // 0.5 + 1.2 (over another period) = 1.7 → 2.
        p.set("b", cpu(60_000, 50_000));
        assert_eq!(p.asked_vcpus(), Some(2));
        p.set("b", cpu(300_000, 100_000));
        assert_eq!(p.wanted_vcpus(), 4, "3.5 → 4");
        p.set("b", cpu(900_000, 100_000));
        assert_eq!(p.asked_vcpus(), Some(10));
        assert_eq!(p.wanted_vcpus(), 4, "capped at the VM's vCPUs");
        p.set("b", cpu(u64::MAX, 1));
        assert_eq!(p.wanted_vcpus(), 4);
        // Memory limits alone leave the CPUs.
        let mut m = PodSize::new(384, 2, 4, rules());
        m.set("a", mem(100 * MIB));
        assert_eq!(m.wanted_vcpus(), 2);
    }

    #[test]
    fn limits_come_from_the_oci_resources() {
        let json = |v: &str| serde_json::from_str::<LinuxResources>(v).unwrap();
        let of = |v: &str| ContainerLimits::of(Some(&json(v)));
        assert_eq!(
            of(r#"{"memory":{"limit":268435456},"cpu":{"quota":150000,"period":100000}}"#),
            ContainerLimits {
                memory_bytes: Some(256 * MIB),
                cpu: Some((150_000, 100_000)),
            }
        );
        for none in [
            r#"{"memory":{"limit":-1},"cpu":{"quota":-1,"period":100000}}"#,
            r#"{"memory":{"limit":0},"cpu":{"quota":1000}}"#,
            r#"{"cpu":{"shares":2,"quota":1000,"period":0}}"#,
            "{}",
        ] {
            assert_eq!(of(none), ContainerLimits::default(), "{none}");
        }
        assert_eq!(ContainerLimits::of(None), ContainerLimits::default());
    }

    #[test]
    fn a_resize_brings_cpus_online_through_the_agent_and_skips_what_did_not_change() {
        let agent = crate::agent::fake::FakeAgent::default();
        let r = Resizer::new(
            "p",
            PodSize::new(384, 2, 4, rules()),
            None,
            Duration::from_secs(1),
        );
        r.update(&agent, |p| p.set("a", cpu(300_000, 100_000)))
            .unwrap();
        r.update(&agent, |p| p.set("a", cpu(250_000, 100_000)))
            .unwrap();
        r.update(&agent, |p| p.set("a", mem(64 * MIB))).unwrap();
        // Without a balloon the memory stays; the CPUs went 2 → 3, then back to 2.
        assert_eq!(agent.calls(), ["SetOnlineCpus 3", "SetOnlineCpus 2"]);
        agent.fail(
            "SetOnlineCpus",
            containerd_shim::protos::ttrpc::Code::FAILED_PRECONDITION,
        );
        let e = r
            .update(&agent, |p| p.set("a", cpu(100_000, 100_000)))
            .unwrap_err();
        assert!(matches!(e, ResizeError::Cpus { wanted: 1, .. }), "{e}");
    }
}
