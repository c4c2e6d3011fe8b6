//! Which of the guest's OOM reports become containerd `TaskOOM` events.
//!
//! The agent reports OOM kills by container id, and the guest is hostile: it can name any
//! id, as often as it likes. An event is published only for a container this shim created
//! (not the CRI sandbox container, which has no process in the VM), and at most once per
//! container per [`MIN_INTERVAL`]; the rest is dropped and counted, and the drops are
//! logged at most once per interval, so that neither containerd's event stream nor the
//! shim's log can be flooded from the guest.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The shortest time between two published OOM events of one container.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// What to do with one report.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Publish,
    /// Dropped; `log` when this drop should be logged (the first of its interval), with
    /// the drops counted since the last logged one.
    Drop {
        log: bool,
        dropped: u64,
    },
}

/// The filter's memory: last publish per container, drops since the last logged one.
#[derive(Debug, Default)]
pub struct OomFilter {
    published: HashMap<String, Instant>,
    dropped: u64,
    last_log: Option<Instant>,
}

impl OomFilter {
    /// The verdict on a report for `id`; `owned` says whether the shim created that
    /// container. Only containers published within the last interval are remembered.
    pub fn admit(&mut self, id: &str, owned: bool, now: Instant) -> Verdict {
        self.published
            .retain(|_, t| now.duration_since(*t) < MIN_INTERVAL);
        let recent = self
            .published
            .get(id)
            .is_some_and(|t| now.duration_since(*t) < MIN_INTERVAL);
        if owned && !recent {
            self.published.insert(id.to_string(), now);
            return Verdict::Publish;
        }
        self.dropped += 1;
        let log = self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= MIN_INTERVAL);
        if log {
            self.last_log = Some(now);
            let dropped = std::mem::take(&mut self.dropped);
            return Verdict::Drop { log, dropped };
        }
        Verdict::Drop {
            log,
            dropped: self.dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_ids_are_dropped_and_floods_are_bounded() {
        let mut f = OomFilter::default();
        let t0 = Instant::now();
        assert_eq!(
            f.admit("not-mine", false, t0),
            Verdict::Drop {
                log: true,
                dropped: 1
            }
        );
        // A flood of reports: one event per interval per container, one log line per
        // interval for all drops.
        let mut published = 0;
        let mut logged = 0;
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_micros(i * 100); // 1 s in all
            match f.admit("c1", true, now) {
                Verdict::Publish => published += 1,
                Verdict::Drop { log: true, .. } => logged += 1,
                Verdict::Drop { .. } => {}
            }
            let _ = f.admit(&format!("x{i}"), false, now);
        }
        assert_eq!(published, 1);
        assert!(logged <= 1, "{logged}");
        assert_eq!(f.published.len(), 1, "unknown ids are not remembered");
        assert_eq!(f.admit("c1", true, t0 + MIN_INTERVAL * 2), Verdict::Publish);
        assert_eq!(f.admit("c2", true, t0 + MIN_INTERVAL * 4), Verdict::Publish);
        assert_eq!(f.published.len(), 1, "c1's entry expired");
    }
}
