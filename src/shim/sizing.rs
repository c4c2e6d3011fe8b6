//! The pod VM's size from the pod: containerd's CRI plugin puts the pod's resources on the
//! sandbox container's spec (`io.kubernetes.cri.sandbox-memory`, `-cpu-quota`,
//! `-cpu-period`, `-cpu-shares`, from the kubelet's `LinuxPodSandboxConfig.resources`).
//!
//! - vCPUs = ⌈quota / period⌉ when both are set (a CPU limit), at least 1 and at most
//!   `max_vcpus`; without a limit, the configured `vcpus`.
//! - memory = the pod's limit + the guest's own overhead (kernel, agent, page cache floor),
//!   rounded up to `memory_step_mib` so that pods of similar size share a template shape,
//!   at most `max_memory_mib`; without a limit, the configured `memory_mib`.
//!
//! Shares alone (a request without a limit) do not size the VM: a request is what the
//! scheduler reserves, not what the pod may use. A limit above what the settings allow is
//! an error naming the annotation, so that a pod never runs in a VM smaller than its limit.

use std::collections::HashMap;

/// The pod's memory limit in bytes (0 or absent: none).
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// CFS quota of the pod, µs per period (≤ 0 or absent: no CPU limit).
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// CFS period of the pod, µs.
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// CPU shares of the pod (its request); not used for sizing.
pub const CRI_SANDBOX_CPU_SHARES: &str = "io.kubernetes.cri.sandbox-cpu-shares";

/// What a pod's resources ask of its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PodResources {
    /// Memory limit, bytes.
    pub memory_bytes: Option<u64>,
    /// CPU limit as (quota, period), µs.
    pub cpu: Option<(u64, u64)>,
}

/// Limits of the sizing (from the shim's settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizingRules {
    pub default_vcpus: usize,
    pub max_vcpus: usize,
    pub default_mem_mib: u64,
    pub min_mem_mib: u64,
    pub max_mem_mib: u64,
    /// Added to the pod's memory limit: what the guest itself uses.
    pub guest_overhead_mib: u64,
    /// Memory sizes are rounded up to a multiple of this.
    pub memory_step_mib: u64,
}

impl SizingRules {
    /// The VM memory (MiB) for a memory limit of `limit_bytes`: the limit plus the guest's
    /// overhead, at least the minimum, rounded up to the step (no maximum applied).
    pub fn vm_mem_mib(&self, limit_bytes: u64) -> u64 {
        let step = self.memory_step_mib.max(1);
        limit_bytes
            .div_ceil(1 << 20)
            .saturating_add(self.guest_overhead_mib)
            .max(self.min_mem_mib)
            .div_ceil(step)
            .saturating_mul(step)
    }
}

/// Why a pod's resources cannot size its VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizingError {
    #[error("annotation {key}={value:?}: not a number")]
    NotANumber { key: &'static str, value: String },
    #[error(
        "the pod's CPU limit needs {needed} vCPUs, more than max_vcpus ({max}): raise \
         max_vcpus in the podvisor config file or lower the pod's limit"
    )]
    TooManyVcpus { needed: u64, max: usize },
    #[error(
        "the pod's memory limit needs a {needed} MiB VM (limit + {overhead} MiB guest \
         overhead), more than max_memory_mib ({max}): raise max_memory_mib in the podvisor \
         config file or lower the pod's limit"
    )]
    TooMuchMemory {
        needed: u64,
        overhead: u64,
        max: u64,
    },
}

fn number(
    annotations: &HashMap<String, String>,
    key: &'static str,
) -> Result<Option<i64>, SizingError> {
    annotations
        .get(key)
        .map(|v| {
            v.trim()
                .parse::<i64>()
                .map_err(|_| SizingError::NotANumber {
                    key,
                    value: v.clone(),
                })
        })
        .transpose()
}

impl PodResources {
    /// The pod's resources from the sandbox spec's annotations (none when containerd set
    /// none: `ctr`, or a pod without limits).
    pub fn from_annotations(
        annotations: &HashMap<String, String>,
    ) -> Result<PodResources, SizingError> {
        let positive = |n: Option<i64>| n.and_then(|n| u64::try_from(n).ok()).filter(|&n| n > 0);
        let memory_bytes = positive(number(annotations, CRI_SANDBOX_MEMORY)?);
        let quota = positive(number(annotations, CRI_SANDBOX_CPU_QUOTA)?);
        let period = positive(number(annotations, CRI_SANDBOX_CPU_PERIOD)?);
        // Parsed for the error only: shares do not size the VM.
        number(annotations, CRI_SANDBOX_CPU_SHARES)?;
        Ok(PodResources {
            memory_bytes,
            cpu: quota.zip(period),
        })
    }

    /// Whether the pod sets any limit that sizes its VM.
    pub fn is_set(&self) -> bool {
        self.memory_bytes.is_some() || self.cpu.is_some()
    }

    /// The VM's (vCPUs, MiB) for these resources under `rules`.
    pub fn vm_size(&self, rules: &SizingRules) -> Result<(usize, u64), SizingError> {
        let vcpus = match self.cpu {
            None => rules.default_vcpus,
            Some((quota, period)) => {
                let needed = quota.div_ceil(period).max(1);
                match usize::try_from(needed) {
                    Ok(n) if n <= rules.max_vcpus => n,
                    _ => {
                        return Err(SizingError::TooManyVcpus {
                            needed,
                            max: rules.max_vcpus,
                        })
                    }
                }
            }
        };
        let mem_mib = match self.memory_bytes {
            None => rules.default_mem_mib,
            Some(bytes) => {
                let needed = rules.vm_mem_mib(bytes);
                if needed > rules.max_mem_mib {
                    return Err(SizingError::TooMuchMemory {
                        needed,
                        overhead: rules.guest_overhead_mib,
                        max: rules.max_mem_mib,
                    });
                }
                needed
            }
        };
        Ok((vcpus, mem_mib))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::grouping::ann;

    /// Sizing rules for tests (also the resize tests').
    pub(crate) fn rules() -> SizingRules {
        SizingRules {
            default_vcpus: 1,
            max_vcpus: 4,
            default_mem_mib: 256,
            min_mem_mib: 64,
            max_mem_mib: 2048,
            guest_overhead_mib: 48,
            memory_step_mib: 64,
        }
    }

    #[test]
    fn a_pod_without_limits_gets_the_configured_size() {
        for a in [
            ann(&[]),
            ann(&[(CRI_SANDBOX_MEMORY, "0"), (CRI_SANDBOX_CPU_QUOTA, "-1")]),
            // A request alone (shares) does not size the VM.
            ann(&[
                (CRI_SANDBOX_CPU_SHARES, "1536"),
                (CRI_SANDBOX_CPU_PERIOD, "100000"),
            ]),
        ] {
            let r = PodResources::from_annotations(&a).unwrap();
            assert!(!r.is_set(), "{a:?}");
            assert_eq!(r.vm_size(&rules()), Ok((1, 256)));
        }
    }

    #[test]
    fn cpu_limits_round_up_to_whole_vcpus() {
        let size = |quota: &str| {
            let a = ann(&[
                (CRI_SANDBOX_CPU_QUOTA, quota),
                (CRI_SANDBOX_CPU_PERIOD, "100000"),
            ]);
            PodResources::from_annotations(&a)
                .unwrap()
                .vm_size(&rules())
                .map(|s| s.0)
        };
        assert_eq!(size("150000"), Ok(2), "1.5 CPUs");
        assert_eq!(size("100000"), Ok(1));
        assert_eq!(size("1000"), Ok(1), "a tenth of a CPU still gets one vCPU");
        assert_eq!(size("400000"), Ok(4));
        assert_eq!(
            size("400001"),
            Err(SizingError::TooManyVcpus { needed: 5, max: 4 })
        );
    }

    #[test]
    fn memory_is_the_limit_plus_overhead_rounded_to_the_step() {
        let size = |bytes: u64| {
            let a = ann(&[(CRI_SANDBOX_MEMORY, &bytes.to_string())]);
            PodResources::from_annotations(&a)
                .unwrap()
                .vm_size(&rules())
                .map(|s| s.1)
        };
        // 256 MiB + 48 → 304 → 320 (step 64).
        assert_eq!(size(256 << 20), Ok(320));
        // One byte over a MiB counts as the next MiB: 257 + 48 = 305 → 320.
        assert_eq!(size((256 << 20) + 1), Ok(320));
        // 16 MiB + 48 = 64: exactly a step.
        assert_eq!(size(16 << 20), Ok(64));
        // Tiny limits still get the minimum.
        assert_eq!(size(1), Ok(64));
        // Pods of 200 to 208 MiB share one shape.
        assert_eq!(size(200 << 20), size(208 << 20));
        // 2000 + 48 = 2048: the largest that fits; one MiB more needs the next step.
        assert_eq!(size(2000 << 20), Ok(2048));
        assert_eq!(
            size(2001 << 20),
            Err(SizingError::TooMuchMemory {
                needed: 2048 + 64,
                overhead: 48,
                max: 2048
            })
        );
    }

    #[test]
    fn bad_numbers_name_the_annotation() {
        let e = PodResources::from_annotations(&ann(&[(CRI_SANDBOX_MEMORY, "lots")]));
        assert_eq!(
            e,
            Err(SizingError::NotANumber {
                key: CRI_SANDBOX_MEMORY,
                value: "lots".into()
            })
        );
        assert!(e.unwrap_err().to_string().contains(CRI_SANDBOX_MEMORY));
    }
}
