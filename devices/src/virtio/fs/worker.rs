//! The FUSE worker: one thread per active virtio-fs device that owns the share's file system
//! and serves both queues (hiprio, then requests) with fuse-backend-rs' `Server`.
//!
//! The event loop only tells the worker "a queue was kicked" ([`Worker::kick`], coalesced by a
//! flag so a guest hammering `QueueNotify` cannot grow the channel); the worker pops chains,
//! checks them ([`check_chain`]), runs `Server::handle_message` on a `Reader`/`Writer` over
//! guest memory, puts the chain on the used ring and raises the interrupt once per pass if
//! the driver wants one (`VIRTIO_RING_F_EVENT_IDX`). Chains are served in order, at most
//! [`CHAIN_BUDGET`] per queue per pass, so FORGETs on hiprio are not starved by a flood of
//! requests.
//!
//! The file system is built on this thread when it starts (see `share` for why), so every
//! activation starts a fresh FUSE session and a reset drops every inode and open file.
//!
//! Failure handling:
//! * a malformed chain is answered with an error or returned with used length 0, with a warn;
//! * a request the server fails on without replying (truncated arguments, a reply that does
//!   not fit) is answered with `-EINVAL`/`-EIO` here;
//! * a broken ring (the available index runs ahead by more than the queue size, the used ring
//!   cannot be written) puts the device into `DEVICE_NEEDS_RESET`; so does a panic inside
//!   fuse-backend-rs (caught: the file system's state can no longer be trusted). The worker
//!   then ignores the queues until the driver resets the device.
//!
//! Stopping (reset or drop) sets a flag, closes the channel and joins the thread: the request
//! being served finishes, nothing else touches guest memory afterwards.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use fuse_backend_rs::abi::fuse_abi::{Opcode, OutHeader};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use log::{debug, error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::ByteValued;

use super::config::ShareConfig;
use super::request::{check_chain, read_out_header, scatter, write_error, OUT_HEADER_LEN};
use super::share::{build_server, isolate_thread_fs_state, BackendError, FuseServer};
use crate::virtio::{lock, GuestMem, Interrupt};

/// Chains served per queue per pass.
pub const CHAIN_BUDGET: usize = 256;

/// What the worker needs.
pub(crate) struct WorkerContext {
    pub share: ShareConfig,
    pub mem: GuestMem,
    pub queues: Vec<Arc<Mutex<Queue>>>,
    pub interrupt: Arc<Interrupt>,
}

/// A running worker thread.
pub(crate) struct Worker {
    tx: Option<Sender<()>>,
    pending: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start the virtio-fs worker thread: {0}; check the process's thread limit")]
    Spawn(io::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the virtio-fs worker exited while starting; see the log above")]
    Died,
}

impl Worker {
    /// Starts the worker; returns once the share's file system is set up (or failed to be).
    pub fn spawn(ctx: WorkerContext) -> Result<Worker, WorkerError> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let pending = Arc::new(AtomicBool::new(false));
        let (thread_stop, thread_pending) = (stop.clone(), pending.clone());
        // Through the spawner: the caller may be a confined vCPU thread.
        let thread = crate::confine::spawn(format!("fs-{}", ctx.share.tag), move || {
            // Confined after the share is opened, before the first request.
            let server = match isolate_thread_fs_state()
                .and_then(|()| build_server(&ctx.share))
                .and_then(|server| {
                    crate::confine::confine(crate::confine::Kind::Fs)
                        .map(|()| server)
                        .map_err(|e| BackendError::Confine(e.to_string()))
                }) {
                Ok(server) => server,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            Serving {
                ctx,
                server,
                stop: thread_stop,
                pending: thread_pending,
                broken: false,
            }
            .run(rx)
        })
        .map_err(WorkerError::Spawn)?;
        let mut worker = Worker {
            tx: Some(tx),
            pending,
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(worker),
            Ok(Err(e)) => {
                worker.stop();
                Err(WorkerError::Backend(e))
            }
            Err(_) => {
                worker.stop();
                Err(WorkerError::Died)
            }
        }
    }

    /// Tells the worker to look at the queues; `false` if it is gone.
    pub fn kick(&self) -> bool {
        if self.pending.swap(true, Ordering::SeqCst) {
            return true; // A pass is already due and will see the new chains.
        }
        self.tx.as_ref().is_some_and(|tx| tx.send(()).is_ok())
    }

    /// Stops the worker and waits for it (at most the request being served).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("virtio-fs: the worker thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The worker thread's state.
struct Serving {
    ctx: WorkerContext,
    server: FuseServer,
    stop: Arc<AtomicBool>,
    pending: Arc<AtomicBool>,
    /// Set with NEEDS_RESET: nothing is served until the device is reset.
    broken: bool,
}

/// How a pass over one queue ended.
enum Drained {
    Empty,
    Budget,
    Broken,
}

impl Serving {
    fn run(mut self, rx: Receiver<()>) {
        while rx.recv().is_ok() {
            loop {
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                // Cleared before reading the rings: a kick from now on sends a new message.
                self.pending.store(false, Ordering::SeqCst);
                while rx.try_recv().is_ok() {}
                if self.broken {
                    break;
                }
                let mut more = false;
                for q in 0..self.ctx.queues.len() {
                    match self.drain(q) {
                        Drained::Empty => {}
                        Drained::Budget => more = true,
                        Drained::Broken => {
                            self.broken = true;
                            break;
                        }
                    }
                }
                if !more || self.broken {
                    break;
                }
            }
        }
    }

    /// Serves queue `q` until it is empty or the budget is spent.
    fn drain(&self, q: usize) -> Drained {
        let mem = &self.ctx.mem;
        let queue = &self.ctx.queues[q];
        let mut served = 0usize;
        let result = 'pass: loop {
            if let Err(e) = lock(queue).disable_notification(mem) {
                break self.fail(q, &format!("cannot update the used ring flags: {e}"));
            }
            loop {
                if self.stop.load(Ordering::SeqCst) {
                    return Drained::Empty;
                }
                if served == CHAIN_BUDGET {
                    break;
                }
                let chain = match lock(queue).iter(mem) {
                    Ok(mut chains) => chains.next(),
                    Err(e) => break 'pass self.fail(q, &format!("bad available ring: {e}")),
                };
                let Some(chain) = chain else { break };
                served += 1;
                let head = chain.head_index();
                let used = self.serve(q, chain);
                if let Err(e) = lock(queue).add_used(mem, head, used) {
                    warn!(
                        "virtio-fs {}: cannot return chain {head} of queue {q}: {e}",
                        self.ctx.share.tag
                    );
                }
                if self.ctx.interrupt.needs_reset() {
                    break 'pass Drained::Broken;
                }
            }
            if served == CHAIN_BUDGET {
                break Drained::Budget;
            }
            match lock(queue).enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break Drained::Empty,
                Err(e) => break self.fail(q, &format!("cannot update the used ring flags: {e}")),
            }
        };
        if served > 0 {
            self.notify(q);
        }
        result
    }

    /// Serves one chain; returns the used length.
    fn serve(&self, q: usize, chain: DescriptorChain<&GuestMem>) -> u32 {
        let mem = &self.ctx.mem;
        let tag = &self.ctx.share.tag;
        let head = chain.head_index();
        let req = match check_chain(head, chain.clone(), mem) {
            Ok(req) => req,
            Err(failure) => {
                let used = failure.answer(mem);
                warn!(
                    "virtio-fs {tag}: bad descriptor chain {head} on queue {q}: {}; {}",
                    failure.error,
                    if used > 0 {
                        "answered with EINVAL"
                    } else {
                        "returned unanswered"
                    }
                );
                return used;
            }
        };
        let h = req.header;
        let Some(opcode) = known_opcode(h.opcode) else {
            // fuse-backend-rs turns opcodes into its `Opcode` enum with a transmute (for a
            // trace log line): the holes in the numbering are undefined behaviour there.
            debug!(
                "virtio-fs {tag}: unknown opcode {} (request {})",
                h.opcode, h.unique
            );
            return write_error(mem, &req.writable, h.unique, libc::ENOSYS);
        };
        let writable = req.writable_len();
        // Zero the reply header so that a reply written by the server can be told apart
        // from none when the server fails.
        if writable >= OUT_HEADER_LEN {
            let _ = scatter(mem, &req.writable, OutHeader::default().as_slice());
        }
        let reader = Reader::from_descriptor_chain(mem, chain.clone());
        let writer = VirtioFsWriter::new(mem, chain);
        let (reader, writer) = match (reader, writer) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => {
                // check_chain covers what these check; only a changed memory map gets here.
                warn!("virtio-fs {tag}: request {} (chain {head}): {e}", h.unique);
                return write_error(mem, &req.writable, h.unique, libc::EINVAL);
            }
        };
        let result = catch_unwind(AssertUnwindSafe(|| {
            self.server
                .handle_message(reader, Writer::VirtioFs(writer), None, None)
        }));
        // A used length: the guest's buffers may add up past u32, the reply never does.
        let answered = |len: u64| u32::try_from(len.min(writable)).unwrap_or(u32::MAX);
        match result {
            // DESTROY replies but reports 0 bytes: the reply header tells.
            Ok(Ok(0)) => answered(u64::from(read_out_header(mem, &req.writable).len)),
            Ok(Ok(len)) => answered(len as u64),
            Ok(Err(e)) => {
                if matches!(opcode, Opcode::Forget | Opcode::BatchForget) {
                    debug!("virtio-fs {tag}: {opcode:?} (no reply) failed: {e}");
                    return 0;
                }
                let out = read_out_header(mem, &req.writable);
                if out.len != 0 {
                    debug!("virtio-fs {tag}: {opcode:?} failed after replying: {e}");
                    return answered(u64::from(out.len));
                }
                let errno = match e {
                    fuse_backend_rs::Error::EncodeMessage(_)
                    | fuse_backend_rs::Error::FailedToWrite(_) => libc::EIO,
                    _ => libc::EINVAL,
                };
                warn!(
                    "virtio-fs {tag}: bad {opcode:?} request {} on node {:#x}: {e}; answered with errno {errno}",
                    h.unique, h.nodeid
                );
                write_error(mem, &req.writable, h.unique, errno)
            }
            Err(_) => {
                error!(
                    "virtio-fs {tag}: the FUSE server panicked on {opcode:?} (request {}); the device needs a reset",
                    h.unique
                );
                // `drain` sees the flag and stops serving until the reset rebuilds the
                // file system.
                self.ctx.interrupt.set_needs_reset();
                write_error(mem, &req.writable, h.unique, libc::EIO)
            }
        }
    }

    fn fail(&self, q: usize, why: &str) -> Drained {
        error!(
            "virtio-fs {}: queue {q}: {why}; the device needs a reset",
            self.ctx.share.tag
        );
        self.ctx.interrupt.set_needs_reset();
        Drained::Broken
    }

    /// Raises the used-buffer interrupt if the driver wants one for queue `q`.
    fn notify(&self, q: usize) {
        // Release the queue lock before writing the irqfd (see the block worker).
        let wants = lock(&self.ctx.queues[q]).needs_notification(&self.ctx.mem);
        match wants {
            Ok(false) => {}
            Ok(true) => self.ctx.interrupt.signal_used_queue(),
            Err(e) => {
                warn!(
                    "virtio-fs {}: cannot read the driver's notification index: {e}",
                    self.ctx.share.tag
                );
                self.ctx.interrupt.signal_used_queue();
            }
        }
    }
}

/// The `Opcode` for `op`, if fuse-backend-rs can represent it: `Opcode::from` transmutes
/// any value below `MaxOpcode`, and 0, 7 and 19 are not variants.
fn known_opcode(op: u32) -> Option<Opcode> {
    match op {
        0 | 7 | 19 => None,
        op if op >= Opcode::MaxOpcode as u32 => Some(Opcode::MaxOpcode),
        // Every other value below MaxOpcode is a variant: the conversion is sound.
        op => Some(Opcode::from(op)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcode_holes_are_not_converted() {
        assert!(known_opcode(0).is_none());
        assert!(known_opcode(7).is_none());
        assert!(known_opcode(19).is_none());
        assert!(matches!(known_opcode(1), Some(Opcode::Lookup)));
        assert!(matches!(known_opcode(49), Some(Opcode::RemoveMapping)));
        assert!(matches!(known_opcode(u32::MAX), Some(Opcode::MaxOpcode)));
        for op in 0..=Opcode::MaxOpcode as u32 {
            if let Some(o) = known_opcode(op) {
                assert!(o as u32 == op || op >= Opcode::MaxOpcode as u32);
            }
        }
    }
}
