//! Receive (host → guest): frames are read from the tap straight into the guest's receive
//! buffers with one `readv`, header included (the tap writes the `virtio_net_hdr_v1`).
//!
//! ## Buffers
//! The frame's size is known only once it is read, so the device first takes (pops)
//! enough available chains for the largest frame the tap can deliver ([`RxConfig::frame_max`]:
//! header + MTU + Ethernet/VLAN header, or 64 KiB + headers once the guest took TSO),
//! reads, and puts the chains the frame did not need back on the ring ([`unpop`]). One
//! host byte after the guest's buffers catches frames that did not fit (the tap truncates
//! silently).
//! * With `VIRTIO_NET_F_MRG_RXBUF` a frame may span several chains: the first
//!   `num_buffers` chains are used, in ring order, and the count is written into the
//!   header's `num_buffers` in the first one ([`spread`]).
//! * Without it each frame takes exactly one chain (`num_buffers` = 1); a frame larger than
//!   the chain is dropped.
//!
//! If the guest has not posted enough buffers the device reads nothing: the frame waits in
//! the tap (whose queue then drops for us when full), notifications on the RX queue are
//! enabled and the caller stops watching the tap until the guest kicks the RX queue
//! ([`RxEnd::NoBuffers`]). An exception keeps a guest with tiny rings going: once every
//! descriptor of the ring is taken, the frame is read into what there is.
//!
//! ## Against a hostile guest
//! A chain with a device-readable descriptor, outside guest memory or in too many pieces
//! is completed at once with used length 0 (Linux drops such a "short packet") and a
//! rate-limited warning. A frame that did not fit (the tap's MTU larger than the NIC's)
//! is dropped and its chains are put back. A broken available ring is an `Err`: the device
//! needs a reset.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};

use super::buffers::{pop_chain, spread, unpop, ChainBuffers, Direction, IoVecs};
use super::header::NUM_BUFFERS_OFFSET;
use super::tap::Tap;
use super::{RateLimitedWarn, HDR_LEN, MAX_IOVECS};
use crate::virtio::GuestMem;

/// What receiving needs from the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxConfig {
    /// `VIRTIO_NET_F_MRG_RXBUF`: a frame may span several chains.
    pub mergeable: bool,
    /// The largest frame the tap can deliver, header included.
    pub frame_max: usize,
}

/// How a receive pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxEnd {
    /// The tap has no more frames.
    TapEmpty,
    /// The guest has not posted enough buffers; RX notifications are enabled.
    NoBuffers,
    /// The budget ran out (the tap may have more).
    Budget,
}

/// Counters of a receive pass.
#[derive(Debug, Default, Clone, Copy)]
pub struct RxCount {
    pub frames: u64,
    pub dropped: u64,
    /// Chains put on the used ring.
    pub used: u64,
}

/// What one pop pass found.
struct Peeked<'m> {
    chains: Vec<ChainBuffers<'m>>,
    capacity: usize,
    /// Stopped before `frame_max` for a reason more buffers would not fix.
    enough: bool,
}

/// Moves up to `budget` frames from `tap` into `queue`'s buffers.
pub fn receive(
    queue: &mut Queue,
    mem: &GuestMem,
    tap: &Tap,
    cfg: RxConfig,
    budget: usize,
    warn: &mut RateLimitedWarn,
) -> Result<(RxEnd, RxCount), String> {
    let mut count = RxCount::default();
    loop {
        if count.frames + count.dropped >= budget as u64 {
            return Ok((RxEnd::Budget, count));
        }
        let peeked = peek(queue, mem, cfg, &mut count, warn)?;
        let Peeked {
            chains,
            capacity,
            enough,
        } = peeked;
        if chains.is_empty() || (cfg.mergeable && capacity < cfg.frame_max && !enough) {
            let seen = chains.len();
            unpop(queue, seen);
            let err = |e| format!("rx queue: cannot enable notifications: {e}");
            queue.enable_notification(mem).map_err(err)?;
            let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(err)?;
            if usize::from((avail - Wrapping(queue.next_avail())).0) > seen {
                continue; // Buffers arrived meanwhile: look again.
            }
            return Ok((RxEnd::NoBuffers, count));
        }
        let slices: Vec<_> = chains
            .iter()
            .flat_map(|c| c.slices().iter().cloned())
            .collect();
        let mut iovs = IoVecs::new(None, &slices);
        // One host byte after the guest's buffers: the tap truncates a frame that does not
        // fit without saying so, and this byte filling up is how the device knows.
        let mut overflow = [0u8; 1];
        iovs.iovs.push(libc::iovec {
            iov_base: overflow.as_mut_ptr().cast(),
            iov_len: overflow.len(),
        });
        let n = match tap.readv(&iovs.iovs) {
            Ok(n) => n,
            Err(e) => {
                unpop(queue, chains.len());
                if e.kind() != io::ErrorKind::WouldBlock {
                    warn.warn(format_args!("cannot read from the tap: {e}"));
                }
                return Ok((RxEnd::TapEmpty, count));
            }
        };
        drop(iovs);
        let caps: Vec<usize> = chains.iter().map(ChainBuffers::len).collect();
        let used = match spread(n, &caps) {
            Some(used) if n >= HDR_LEN && (cfg.mergeable || used.len() == 1) => used,
            _ => {
                unpop(queue, chains.len());
                count.dropped += 1;
                warn.warn(format_args!(
                    "{n}-byte frame from the tap dropped: the guest's {} buffer(s) hold {capacity} bytes (is the tap's MTU larger than the NIC's?)",
                    chains.len()
                ));
                continue;
            }
        };
        // At most the chains popped, which the queue size (a u16) bounds.
        let num_buffers = u16::try_from(used.len()).unwrap_or(u16::MAX);
        chains[0].write_at(NUM_BUFFERS_OFFSET, &num_buffers.to_le_bytes());
        unpop(queue, chains.len() - used.len());
        for (chain, len) in chains.iter().zip(used) {
            queue
                .add_used(mem, chain.head, len)
                .map_err(|e| format!("rx queue: cannot return chain {}: {e}", chain.head))?;
            count.used += 1;
        }
        count.frames += 1;
    }
}

/// Pops chains until they hold `cfg.frame_max` bytes (one chain without mergeable
/// buffers). Bad chains met first are completed with length 0.
fn peek<'m>(
    queue: &mut Queue,
    mem: &'m GuestMem,
    cfg: RxConfig,
    count: &mut RxCount,
    warn: &mut RateLimitedWarn,
) -> Result<Peeked<'m>, String> {
    let mut chains = Vec::new();
    let mut capacity = 0usize;
    let mut slices = 0usize;
    let mut descriptors = 0usize;
    let mut enough = false;
    while capacity < cfg.frame_max && (cfg.mergeable || chains.is_empty()) {
        let chain = pop_chain(queue, mem, "rx")?;
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        match ChainBuffers::collect(
            mem,
            chain,
            Direction::DeviceWrites,
            usize::MAX,
            (MAX_IOVECS - 1).saturating_sub(slices),
        ) {
            Ok(bufs) if bufs.len() >= HDR_LEN => {
                capacity += bufs.len();
                slices += bufs.slices().len();
                descriptors += bufs.descriptors();
                chains.push(bufs);
            }
            result => {
                if !chains.is_empty() {
                    // Leave it for the next frame (only the first chains can be completed
                    // out of turn) and make do with what there is.
                    unpop(queue, 1);
                    enough = true;
                    break;
                }
                let why = match result {
                    Ok(b) => format!("{} bytes cannot hold a header", b.len()),
                    Err(e) => e.to_string(),
                };
                warn.warn(format_args!("rx chain {head} returned unused: {why}"));
                queue
                    .add_used(mem, head, 0)
                    .map_err(|e| format!("rx queue: cannot return chain {head}: {e}"))?;
                count.used += 1;
            }
        }
    }
    // Every descriptor of the ring is posted: the guest cannot give more.
    if descriptors >= usize::from(queue.size()) || slices >= MAX_IOVECS - 1 {
        enough = true;
    }
    Ok(Peeked {
        chains,
        capacity,
        enough,
    })
}
