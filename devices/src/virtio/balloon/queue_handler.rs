//! Event-loop glue: the balloon's subscriber. A kick of the inflate queue discards the pages
//! named in each chain, a kick of the deflate queue counts them (they come back when the
//! guest touches them), a kick of the reporting queue discards the reported ranges. Every
//! chain goes back at once with used length 0: the device holds nothing between events.

use std::sync::Arc;

use event_manager::EventOps;
use log::debug;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::device::Shared;
use super::discard::discard_guest_range;
use super::{CHAIN_BUDGET, DEFLATEQ, INFLATEQ, PAGE_SHIFT, PAGE_SIZE, REPORTINGQ};
use crate::virtio::common::{
    impl_subscriber, ActiveQueues, ActiveState, HandlerCore, QueueHandler,
};
use crate::virtio::net::RateLimitedWarn;
use crate::virtio::{GuestMem, QueuePosition};

/// Most bytes of page frame numbers one chain may carry (16 Ki frames; Linux sends 256 per
/// chain). A descriptor that would go past it is skipped: the device never reads, or holds,
/// an unbounded amount of them (a chain can be 2^32 bytes long, through an indirect table
/// of 65,535 descriptors that all name one buffer).
pub const MAX_PFN_BYTES: u32 = 64 << 10;
/// Most descriptors of a chain the device looks at (Linux uses 1 for inflate and deflate,
/// at most 32 for a report); the rest of a longer chain is skipped, so that one chain is
/// bounded work on the event loop.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;

/// What exists only while the device is active.
pub(crate) struct Active {
    /// Memory, interrupt and the queues in use (inflate, deflate[, reporting]).
    pub io: ActiveQueues,
}

impl ActiveState for Active {
    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.io.queue_positions()
    }
}

/// The balloon's event-loop subscriber.
pub struct BalloonHandler {
    core: HandlerCore<Active>,
    shared: Arc<Shared>,
    warn: RateLimitedWarn,
}

impl BalloonHandler {
    pub(crate) fn new(core: HandlerCore<Active>, shared: Arc<Shared>) -> Self {
        Self {
            core,
            shared,
            warn: RateLimitedWarn::new("virtio-balloon"),
        }
    }
}

impl QueueHandler for BalloonHandler {
    fn kicked(&mut self, q: usize, _ops: &mut EventOps) {
        let Some(active) = self.core.active_mut().filter(|a| !a.io.broken) else {
            debug!("virtio-balloon: kick of queue {q} while the device is not active; ignored");
            return;
        };
        if q >= active.io.queues.len() {
            // The reporting queue's kick while the driver did not take reporting.
            return;
        }
        let more = match serve(&mut active.io, q, &self.shared, &mut self.warn) {
            Ok(more) => more,
            Err(why) => active.io.fail(why),
        };
        if more {
            self.core.rekick(q);
        }
    }
}

impl_subscriber!(BalloonHandler, Active);

/// Serves up to [`CHAIN_BUDGET`] chains of queue `q`; `Ok(true)` if chains are left. An
/// `Err` is a broken ring.
fn serve(
    io: &mut ActiveQueues,
    q: usize,
    shared: &Shared,
    warn: &mut RateLimitedWarn,
) -> Result<bool, String> {
    let mem = io.mem.clone();
    let mut used = 0usize;
    let more = 'pass: loop {
        io.queues[q]
            .disable_notification(&mem)
            .map_err(|e| format!("queue {q}: cannot update the used ring flags: {e}"))?;
        loop {
            if used >= CHAIN_BUDGET {
                break 'pass true;
            }
            let chain = match io.queues[q].iter(&mem) {
                Ok(mut chains) => chains.next(),
                Err(e) => return Err(format!("queue {q}: bad available ring: {e}")),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            match q {
                INFLATEQ => inflate(&mem, chain, shared, warn),
                DEFLATEQ => deflate(&mem, chain, shared, warn),
                REPORTINGQ => report(&mem, chain, shared, warn),
                _ => {}
            }
            io.add_used(q, head, 0);
            used += 1;
        }
        match io.queues[q].enable_notification(&mem) {
            Ok(true) => continue,
            Ok(false) => break false,
            Err(e) => return Err(format!("queue {q}: cannot update the used ring flags: {e}")),
        }
    };
    if used > 0 {
        io.notify(q);
    }
    Ok(more)
}

/// Whether descriptor `index` of chain `head` is past [`MAX_CHAIN_DESCRIPTORS`]; if so,
/// the rest of the chain is counted as one rejection.
fn past_limit(
    index: usize,
    what: &str,
    head: u16,
    shared: &Shared,
    warn: &mut RateLimitedWarn,
) -> bool {
    if index < MAX_CHAIN_DESCRIPTORS {
        return false;
    }
    shared.reject(1);
    warn.warn(format_args!(
        "{what} chain {head} has more than {MAX_CHAIN_DESCRIPTORS} descriptors; the rest is skipped"
    ));
    true
}

/// The page frame numbers of a chain's device-readable buffers (little-endian `u32`s),
/// in order, at most [`MAX_PFN_BYTES`] of them; what cannot be read is counted as
/// rejected.
fn pfns(
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
    what: &str,
    shared: &Shared,
    warn: &mut RateLimitedWarn,
) -> Vec<u32> {
    let head = chain.head_index();
    let mut out = Vec::new();
    let mut room = MAX_PFN_BYTES as usize;
    for (index, desc) in chain.enumerate() {
        if past_limit(index, what, head, shared, warn) {
            break;
        }
        if desc.is_write_only() {
            shared.reject(1);
            warn.warn(format_args!(
                "{what} chain {head}: descriptor {index} is device-writable; skipped"
            ));
            continue;
        }
        let len = (desc.len() as usize) & !3;
        if len > room {
            shared.reject(1);
            warn.warn(format_args!(
                "{what} chain {head}: descriptor {index} has {} bytes, more than the {room} left \
                 of the chain's {MAX_PFN_BYTES}; skipped",
                desc.len()
            ));
            continue;
        }
        let mut bytes = vec![0u8; len];
        if let Err(e) = mem.read_slice(&mut bytes, desc.addr()) {
            shared.reject(1);
            warn.warn(format_args!(
                "{what} chain {head}: descriptor {index} at {:#x} is not guest memory ({e}); skipped",
                desc.addr().0
            ));
            continue;
        }
        room -= len;
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    out
}

/// Runs of consecutive frame numbers, as (first, count), in the order given.
fn runs(pfns: &[u32]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &pfn in pfns {
        let pfn = u64::from(pfn);
        match out.last_mut() {
            Some((first, count)) if *first + *count == pfn => *count += 1,
            _ => out.push((pfn, 1)),
        }
    }
    out
}

fn inflate(
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
    shared: &Shared,
    warn: &mut RateLimitedWarn,
) {
    let head = chain.head_index();
    for (first, count) in runs(&pfns(mem, chain, "inflate", shared, warn)) {
        let addr = GuestAddress(first << PAGE_SHIFT);
        match discard_guest_range(mem, addr, count * PAGE_SIZE) {
            Ok(()) => shared.inflated(count),
            Err(e) => {
                shared.reject(count);
                warn.warn(format_args!("inflate chain {head}: {e}; those pages stay"));
            }
        }
    }
}

fn deflate(
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
    shared: &Shared,
    warn: &mut RateLimitedWarn,
) {
    let count = pfns(mem, chain, "deflate", shared, warn).len();
    shared.deflated(u64::try_from(count).unwrap_or(u64::MAX));
}

fn report(
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
    shared: &Shared,
    warn: &mut RateLimitedWarn,
) {
    let head = chain.head_index();
    for (index, desc) in chain.enumerate() {
        if past_limit(index, "reporting", head, shared, warn) {
            break;
        }
        if !desc.is_write_only() {
            shared.reject(1);
            warn.warn(format_args!(
                "reporting chain {head}: descriptor {index} is device-readable; skipped"
            ));
            continue;
        }
        let len = u64::from(desc.len());
        match discard_guest_range(mem, desc.addr(), len) {
            Ok(()) => shared.reported(len),
            Err(e) => {
                shared.reject(1);
                warn.warn(format_args!("reporting chain {head}: {e}; skipped"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_join_consecutive_frames_only() {
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(
            runs(&[5, 6, 7, 9, 8, 8]),
            vec![(5, 3), (9, 1), (8, 1), (8, 1)]
        );
        assert_eq!(runs(&[u32::MAX, 0]), vec![(u64::from(u32::MAX), 1), (0, 1)]);
    }
}
