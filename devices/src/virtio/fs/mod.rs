//! virtio-fs in the VMM process: a host directory shared with the guest, which mounts it
//! with `mount -t virtiofs TAG /mnt`. No virtiofsd: the FUSE server (fuse-backend-rs'
//! `Server` + `PassthroughFs`) runs on a worker thread of this process.
//!
//! * [`config`]: [`ShareConfig`] — tag, host directory, [`ShareOptions`] (read-only, cache
//!   policy, xattrs, writeback, device nodes); parses `TAG=DIR[,ro][,cache=...]`.
//! * [`device`]: the [`Fs`] device — config space (tag + one request queue), features,
//!   activation, reset, [`FsState`].
//! * [`queue_handler`]: the event-loop subscriber — kick → wake the worker.
//! * `worker`: the FUSE thread — pops chains from both queues, serves them, fills the used
//!   rings, raises the interrupt.
//! * [`request`]: descriptor-chain checks and error replies (unit-tested without a VM).
//! * [`share`]: the file system — `PassthroughFs` under a policy wrapper ([`ShareFs`]:
//!   read-only, no device nodes, xattr size clamp) mounted at `/` of a `Vfs`.
//! * `test_client` (tests and the `test-utils` feature): a FUSE client that drives the
//!   device through the virtio-mmio transport like Linux's virtio-fs driver.
//!
//! Several shares per VM are several devices, one per tag (a virtio-fs device has exactly
//! one tag); use [`ShareConfig::check_unique_tags`] on the VM's list.
//!
//! Queues: hiprio (0, FORGETs) and one request queue (1), [`QUEUE_SIZE`] entries each.
//! Offered features: `VERSION_1`, `INDIRECT_DESC`, `EVENT_IDX`; no notification queue and
//! no DAX window (the guest's page cache holds file data, `mmap` of binaries works through
//! it).
//!
//! Ownership and permissions: the guest kernel checks permissions itself (virtio-fs mounts
//! with `default_permissions`). Files, directories, symlinks and nodes are created with the
//! guest caller's uid/gid (the worker thread switches its effective ids per request, which
//! needs the VMM to run as root — otherwise only the VMM's own uid can create); `chown`,
//! `chmod`, rename, unlink and link run with the VMM's credentials. Everything the guest's
//! root can do inside the share, the VMM can do on the host: do not execute from share
//! directories on the host, or mount them `nosuid,nodev`.
//!
//! Limits worth knowing: every inode the guest holds is an open `O_PATH` fd in this process
//! until the guest forgets it, so a guest walking a huge tree uses that many fds (raise
//! `RLIMIT_NOFILE` for the VMM); the FUSE session is not part of [`FsState`].

pub mod config;
pub mod device;
pub mod limits;
pub mod queue_handler;
pub mod request;
pub mod share;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_client;
mod worker;

#[cfg(test)]
mod tests;

pub use config::{CachePolicy, ConfigError, ShareConfig, ShareOptions, TAG_LEN};
pub use device::{Fs, FsError, FsState, CONFIG_LEN};
pub use queue_handler::FsHandler;
pub use share::{BackendError, ShareFs};
pub use worker::{WorkerError, CHAIN_BUDGET};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Request queues (config `num_request_queues`).
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// hiprio + request queues.
pub const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES as usize;
/// Index of the hiprio queue.
pub const HIPRIO_QUEUE: usize = 0;
/// Index of the (only) request queue.
pub const REQUEST_QUEUE: usize = 1;
