//! virtio-blk: a raw image file (or host block device) as the guest's `/dev/vdX`.
//!
//! * [`device`]: the [`Block`] device — config space, features, activation, reset, state.
//! * [`request`]: parsing a descriptor chain into a [`Request`], with every check a hostile
//!   guest could break (unit-tested without a VM).
//! * [`queue_handler`]: the event-loop subscriber — kick → pop chains → parse → worker.
//! * `worker`: the I/O thread — serves requests, writes status bytes, fills the used ring,
//!   raises the interrupt.
//! * [`disk`]: the back end — `preadv`/`pwritev` straight into guest memory, `fdatasync`,
//!   `fallocate` for discard/write-zeroes.
//!
//! Offered: `VERSION_1`, `INDIRECT_DESC`, `EVENT_IDX`, `SIZE_MAX`, `SEG_MAX`, `BLK_SIZE`,
//! `FLUSH`, `RO` for read-only disks, `DISCARD` + `WRITE_ZEROES` on writable regular files.
//! One request queue of [`QUEUE_SIZE`]. The page cache is used (writeback caching), so
//! FLUSH is what makes writes durable; Linux sends it for fsync and journal commits.
//!
//! ## Why a worker thread and not io_uring
//! Requests must not block the event loop that also serves vsock, virtio-fs and the console,
//! so file I/O runs elsewhere. io_uring would avoid the thread and batch system calls, but it
//! is missing or disabled in many sandboxes and container hosts (seccomp profiles, gVisor,
//! `kernel.io_uring_disabled`), and a shim must run wherever containerd runs. A worker
//! thread with `preadv`/`pwritev` is portable, keeps the zero-copy path (the kernel copies
//! between the page cache and guest memory directly), and costs one thread per active disk.
//! One thread also keeps requests in order, which makes FLUSH trivially correct. io_uring can
//! be added later as a second back end behind the same `Job` interface where it exists.

pub mod device;
pub mod disk;
pub mod queue_handler;
pub mod request;
mod worker;

#[cfg(test)]
mod tests;

pub use device::{Block, BlockConfig, BlockError, BlockState};
pub use disk::{Disk, DiskError, ID_BYTES};
pub use queue_handler::BlockHandler;
pub use request::{Request, RequestError, RequestKind, SECTOR_SIZE};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments per request (config `seg_max`).
pub const SEG_MAX: u32 = 128;
/// Largest data segment (config `size_max`).
pub const SIZE_MAX: u32 = 128 << 10;
/// Largest request: what `seg_max` × `size_max` allows (16 MiB).
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Largest discard (config `max_discard_sectors`): 1 GiB.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> 9;
/// Largest write-zeroes (config `max_write_zeroes_sectors`): 1 GiB.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = (1 << 30) >> 9;
/// Discard granularity (config `discard_sector_alignment`): 4 KiB.
pub const DISCARD_ALIGNMENT_SECTORS: u32 = 8;
