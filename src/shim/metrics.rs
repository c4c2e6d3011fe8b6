//! The agent's cgroup v2 statistics of a container as containerd's task metrics:
//! `io.containerd.cgroups.v2.Metrics` in a protobuf `Any` (what `ctr task metrics` and the
//! CRI plugin's ContainerStats decode).

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use podvisor_agent_protocol::agent::StatsResponse;

/// containerd's type URL of cgroup v2 metrics.
pub const METRICS_V2_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// Converts the agent's statistics.
pub fn metrics(stats: &StatsResponse) -> Metrics {
    let mut m = Metrics::new();
    if stats.has_cpu {
        let c = &stats.cpu;
        m.cpu = MessageField::some(CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if stats.has_memory {
        let s = &stats.memory;
        let stat = |k: &str| s.stat.get(k).copied().unwrap_or(0);
        m.memory = MessageField::some(MemoryStat {
            usage: s.usage,
            usage_limit: s.limit,
            max_usage: s.max_usage,
            anon: stat("anon"),
            file: stat("file"),
            kernel_stack: stat("kernel_stack"),
            slab: stat("slab"),
            sock: stat("sock"),
            shmem: stat("shmem"),
            file_mapped: stat("file_mapped"),
            file_dirty: stat("file_dirty"),
            file_writeback: stat("file_writeback"),
            anon_thp: stat("anon_thp"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            unevictable: stat("unevictable"),
            slab_reclaimable: stat("slab_reclaimable"),
            slab_unreclaimable: stat("slab_unreclaimable"),
            pgfault: stat("pgfault"),
            pgmajfault: stat("pgmajfault"),
            workingset_refault: stat("workingset_refault"),
            workingset_activate: stat("workingset_activate"),
            workingset_nodereclaim: stat("workingset_nodereclaim"),
            pgrefill: stat("pgrefill"),
            pgscan: stat("pgscan"),
            pgsteal: stat("pgsteal"),
            pgactivate: stat("pgactivate"),
            pgdeactivate: stat("pgdeactivate"),
            pglazyfree: stat("pglazyfree"),
            pglazyfreed: stat("pglazyfreed"),
            thp_fault_alloc: stat("thp_fault_alloc"),
            thp_collapse_alloc: stat("thp_collapse_alloc"),
            ..Default::default()
        });
        m.memory_events = MessageField::some(MemoryEvents {
            oom: s.oom,
            oom_kill: s.oom_kill,
            ..Default::default()
        });
    }
    if stats.has_pids {
        m.pids = MessageField::some(PidsStat {
            current: stats.pids.current,
            limit: stats.pids.limit,
            ..Default::default()
        });
    }
    if stats.has_io {
        let i = &stats.io;
        m.io = MessageField::some(IOStat {
            usage: vec![IOEntry {
                rbytes: i.read_bytes,
                wbytes: i.write_bytes,
                rios: i.read_ios,
                wios: i.write_ios,
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    m
}

/// The metrics as containerd's `StatsResponse.stats`.
pub fn metrics_any(stats: &StatsResponse) -> Result<Any, String> {
    let value = metrics(stats)
        .write_to_bytes()
        .map_err(|e| format!("encode metrics: {e}"))?;
    let mut any = Any::new();
    any.type_url = METRICS_V2_TYPE_URL.to_string();
    any.value = value;
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_agent_protocol::agent::MemoryStats;

    #[test]
    fn converts_agent_stats() {
        let mut s = StatsResponse::new();
        s.has_memory = true;
        let mut mem = MemoryStats::new();
        mem.usage = 4096;
        mem.limit = u64::MAX;
        mem.oom_kill = 2;
        mem.stat.insert("anon".into(), 1234);
        s.memory = MessageField::some(mem);
        s.has_pids = true;
        s.pids.mut_or_insert_default().current = 3;
        let any = metrics_any(&s).unwrap();
        assert_eq!(any.type_url, METRICS_V2_TYPE_URL);
        let back = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(back.memory.usage, 4096);
        assert_eq!(back.memory.usage_limit, u64::MAX);
        assert_eq!(back.memory.anon, 1234);
        assert_eq!(back.memory_events.oom_kill, 2);
        assert_eq!(back.pids.current, 3);
        assert!(back.cpu.is_none(), "no cpu stats from the agent: none sent");
        assert!(back.io.is_none());
    }
}
