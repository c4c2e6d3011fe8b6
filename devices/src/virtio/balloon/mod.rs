//! virtio-balloon: the guest gives memory back to the host, on request (the balloon inflates
//! to a target the host sets) and on its own (free page reporting).
//!
//! What each part is for:
//! * Resizing a running pod's memory: the host sets the target number of 4 KiB pages the
//!   balloon should hold ([`BalloonControl::set_target_pages`], a config-change interrupt);
//!   the guest driver allocates that many pages, hands their frame numbers over on the
//!   inflate queue and takes them out of its `MemTotal`; lowering the target gives them back
//!   (deflate queue). The host discards inflated pages at once.
//! * Giving freed memory back: with `VIRTIO_BALLOON_F_REPORTING` the guest's page allocator
//!   reports large free blocks (2 MiB on x86) on the reporting queue a few seconds after they
//!   are freed; the host discards them, so a guest that touched memory and freed it returns
//!   to its baseline host footprint.
//!
//! Offered: `VERSION_1` and `F_REPORTING`. Not offered: `MUST_TELL_HOST` (pages are discarded
//! on inflate and come back zero-filled, or as the template's page, when the guest touches
//! them again, so a deflate needs no host work first), `STATS_VQ`, `DEFLATE_ON_OOM` (an
//! inflated balloon is a resize: the guest must not take the pages back under pressure),
//! `FREE_PAGE_HINT` (a live-migration aid) and `PAGE_POISON` (reported pages have no contents
//! the guest may rely on).
//!
//! Queues: inflate (0), deflate (1) and, when the driver took `F_REPORTING`, reporting (2):
//! a driver numbers the queues of the features it took consecutively
//! ([`VirtioDevice::queues_in_use`](crate::virtio::VirtioDevice::queues_in_use)). Config
//! space: `num_pages` (the target, written by the host) and `actual` (what the driver holds,
//! written by the driver).
//!
//! Rules enforced here against a hostile guest, none of which panics:
//! * a page frame number, or a reported range, is discarded only if it lies wholly inside
//!   one guest RAM region and is page-aligned; anything else (outside RAM, in the MMIO gap,
//!   wrapping around, unaligned) is skipped, counted in [`BalloonStats::rejected`] and
//!   logged at most once a second. A guest can discard only its own memory;
//! * inflate and deflate buffers must be device-readable, reporting buffers device-writable;
//!   a descriptor the other way round is skipped (counted), a length that is not a multiple
//!   of 4 on the inflate/deflate queues loses its trailing bytes;
//! * a chain is read up to 64 descriptors and, on the inflate/deflate queues, 64 KiB of
//!   frame numbers: the rest is skipped and counted, so a chain (up to 2^32 bytes through
//!   an indirect table) costs bounded memory and work;
//! * every chain goes back with used length 0, whatever it held; a broken available ring
//!   puts the device into `DEVICE_NEEDS_RESET`;
//! * a pass serves at most [`CHAIN_BUDGET`] chains and then kicks itself, so a guest flooding
//!   the queues cannot starve the other devices on the event loop;
//! * `actual` is the driver's word: it is reported ([`BalloonControl::actual_pages`]), never
//!   used for anything else.
//!
//! Discarding is `madvise(MADV_DONTNEED)` on the host mapping of guest RAM. Guest RAM is a
//! private mapping (anonymous, or a template's memory file mapped `MAP_PRIVATE`), so the
//! host memory behind the page is freed at once and the next guest access reads zeros (or
//! the template's page, shared through the page cache).
//!
//! ## Snapshots
//! [`BalloonState`] holds the target, the driver's `actual`, the features and the queue
//! positions. Chains are served within one event (none is held by the device), so any point
//! where the event loop is not inside the handler is quiescent.

pub mod device;
mod discard;
mod queue_handler;

#[cfg(test)]
mod tests;

pub use device::{Balloon, BalloonControl, BalloonState, BalloonStats};
pub use discard::{discard_guest_range, DiscardError};
pub use queue_handler::BalloonHandler;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The inflate queue.
pub const INFLATEQ: usize = 0;
/// The deflate queue.
pub const DEFLATEQ: usize = 1;
/// The free page reporting queue (present when the driver took [`F_REPORTING`]).
pub const REPORTINGQ: usize = 2;
/// Chains served per queue and pass before the handler yields to other devices.
pub const CHAIN_BUDGET: usize = 256;

/// The balloon's page unit: frame numbers on the inflate/deflate queues count 4 KiB pages
/// whatever the guest's or host's page size (`VIRTIO_BALLOON_PFN_SHIFT`).
pub const PAGE_SHIFT: u32 = 12;
/// Bytes in a balloon page.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Feature bits (virtio 1.x §5.5.3; virtio-bindings does not carry them).
/// The host must be told before a deflated page is used (not offered).
pub const F_MUST_TELL_HOST: u32 = 0;
/// A statistics queue (not offered).
pub const F_STATS_VQ: u32 = 1;
/// The guest deflates on OOM (not offered).
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// Free page hinting (not offered).
pub const F_FREE_PAGE_HINT: u32 = 3;
/// Page poisoning (not offered).
pub const F_PAGE_POISON: u32 = 4;
/// Free page reporting: the reporting queue.
pub const F_REPORTING: u32 = 5;
