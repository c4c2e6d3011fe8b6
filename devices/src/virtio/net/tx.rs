//! Transmit (guest → host): every available chain on the TX queue is one frame, a
//! `virtio_net_hdr_v1` and the Ethernet frame, which goes to the tap in one `writev`
//! straight from guest memory. The 12 header bytes are copied out and checked first
//! ([`NetHdr::check_tx`]) so that a guest cannot change them between the check and the
//! write; the payload is not copied.
//!
//! A chain that cannot be a frame (device-writable buffers, outside guest memory, shorter
//! than a header and an Ethernet header, longer than [`MAX_FRAME_LEN`] after the header,
//! too many pieces) or whose header asks for offloads that were not negotiated is dropped:
//! it goes back to the guest with used length 0, like every transmitted chain, and a
//! rate-limited warning is logged. The guest never learns whether a frame made it.

use std::io;

use virtio_queue::{Queue, QueueT};

use super::buffers::{pop_chain, ChainBuffers, ChainError, Direction, IoVecs};
use super::header::{HeaderError, NetHdr};
use super::tap::Tap;
use super::{RateLimitedWarn, ETH_HLEN, HDR_LEN, MAX_FRAME_LEN, MAX_IOVECS};
use crate::virtio::GuestMem;

/// Why a transmitted frame was dropped.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("{0}-byte chain is shorter than a virtio-net header and an Ethernet header")]
    Short(usize),
    #[error("bad virtio-net header: {0}")]
    Header(#[from] HeaderError),
    #[error("the tap refused the frame: {0}")]
    Tap(io::Error),
}

/// How a transmit pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxEnd {
    /// The queue is empty (notifications are enabled again).
    Empty,
    /// The budget ran out with chains left.
    Budget,
}

/// Counters of a transmit pass.
#[derive(Debug, Default, Clone, Copy)]
pub struct TxCount {
    pub sent: u64,
    pub dropped: u64,
    /// Chains returned to the used ring.
    pub used: u64,
}

/// Sends up to `budget` frames from `queue` to `tap`. `acked` are the negotiated features.
/// An `Err` is a broken ring: the device needs a reset.
pub fn transmit(
    queue: &mut Queue,
    mem: &GuestMem,
    tap: &Tap,
    acked: u64,
    budget: usize,
    warn: &mut RateLimitedWarn,
) -> Result<(TxEnd, TxCount), String> {
    let mut count = TxCount::default();
    loop {
        queue
            .disable_notification(mem)
            .map_err(|e| format!("tx queue: cannot update the used ring flags: {e}"))?;
        loop {
            if count.used >= budget as u64 {
                return Ok((TxEnd::Budget, count));
            }
            let chain = pop_chain(queue, mem, "tx")?;
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            match ChainBuffers::collect(
                mem,
                chain,
                Direction::DeviceReads,
                HDR_LEN + MAX_FRAME_LEN,
                MAX_IOVECS - 1,
            )
            .map_err(TxError::from)
            .and_then(|bufs| send(&bufs, tap, acked))
            {
                Ok(()) => count.sent += 1,
                Err(e) => {
                    count.dropped += 1;
                    warn.warn(format_args!("tx chain {head} dropped: {e}"));
                }
            }
            queue
                .add_used(mem, head, 0)
                .map_err(|e| format!("tx queue: cannot return chain {head}: {e}"))?;
            count.used += 1;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => return Ok((TxEnd::Empty, count)),
            Err(e) => return Err(format!("tx queue: cannot update the used ring flags: {e}")),
        }
    }
}

/// Checks the header of the frame in `bufs` and writes the frame to the tap.
fn send(bufs: &ChainBuffers<'_>, tap: &Tap, acked: u64) -> Result<(), TxError> {
    if bufs.len() < HDR_LEN + ETH_HLEN {
        return Err(TxError::Short(bufs.len()));
    }
    let mut raw = [0u8; HDR_LEN];
    bufs.read_at(0, &mut raw);
    let hdr = NetHdr::parse(&raw).check_tx(acked, bufs.len() - HDR_LEN)?;
    let hdr = hdr.to_bytes();
    let payload = bufs.slices_from(HDR_LEN);
    let iovs = IoVecs::new(Some(&hdr), &payload);
    tap.writev(&iovs.iovs).map_err(TxError::Tap)?;
    Ok(())
}
