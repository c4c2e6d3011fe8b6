//! The I/O worker: one thread per active block device that owns the blocking file I/O and
//! completes requests (status byte, used ring, interrupt).
//!
//! Jobs arrive in queue order over a channel and run one at a time, so a FLUSH covers every
//! write the guest submitted before it. At most a queue's worth of jobs can be in flight (the
//! guest cannot reuse a descriptor before it is used), so the channel needs no bound. After
//! each burst (channel empty) the worker asks the queue whether the driver wants an interrupt
//! (`VIRTIO_RING_F_EVENT_IDX`) and raises it once.
//!
//! Stopping (device reset or drop) sets a flag, closes the channel and joins the thread:
//! the request being served finishes, queued ones are dropped without touching guest memory.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{error, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::disk::{Disk, ID_BYTES};
use super::request::{Request, RequestKind, Segment, STATUS_IOERR, STATUS_OK};
use crate::virtio::{lock, GuestMem, Interrupt};

/// Work for the worker.
#[derive(Debug)]
pub(crate) enum Job {
    /// A valid request to serve.
    Serve(Request),
    /// A malformed chain: write `status` (if the chain has a status byte) and return it.
    Fail {
        head: u16,
        status: Option<(GuestAddress, u8)>,
    },
}

/// What the worker needs to serve and complete requests.
pub(crate) struct WorkerContext {
    pub disk: Arc<Disk>,
    pub mem: GuestMem,
    pub queue: Arc<Mutex<Queue>>,
    pub interrupt: Arc<Interrupt>,
}

/// A running worker thread.
pub(crate) struct Worker {
    tx: Option<Sender<Job>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the worker thread.
    pub fn spawn(ctx: WorkerContext) -> io::Result<Worker> {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        // Through the spawner: the caller may be a confined vCPU thread.
        let thread = crate::confine::spawn("blk-io".into(), move || {
            // Before the first request: requests are guest-driven.
            if let Err(e) = crate::confine::confine(crate::confine::Kind::Block) {
                log::error!("virtio-blk worker: {e}; the disk stops serving requests");
                return;
            }
            run(ctx, rx, thread_stop)
        })?;
        Ok(Worker {
            tx: Some(tx),
            stop,
            thread: Some(thread),
        })
    }

    /// Queues a job; `false` if the worker is gone.
    pub fn submit(&self, job: Job) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }

    /// Stops the worker and waits for it (at most the request being served).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("virtio-blk: the I/O worker panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(ctx: WorkerContext, rx: Receiver<Job>, stop: Arc<AtomicBool>) {
    while let Ok(job) = rx.recv() {
        let mut next = Some(job);
        while let Some(job) = next {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            ctx.handle(job);
            next = rx.try_recv().ok();
        }
        ctx.notify();
    }
}

impl WorkerContext {
    fn handle(&self, job: Job) {
        match job {
            Job::Serve(req) => {
                let (status, written) = self.serve(&req);
                self.complete(req.head, Some((req.status, status)), written);
            }
            Job::Fail { head, status } => self.complete(head, status, 0),
        }
    }

    /// Runs a request: (status byte, bytes written to guest data buffers).
    fn serve(&self, req: &Request) -> (u8, u32) {
        let result = match &req.kind {
            RequestKind::In { sector, data } => self
                .disk
                .read(&self.mem, *sector, data)
                // parse_chain held it to MAX_REQUEST_BYTES (16 MiB); a used length saturates.
                .map(|()| u32::try_from(req.data_len()).unwrap_or(u32::MAX)),
            RequestKind::Out { sector, data } => {
                self.disk.write(&self.mem, *sector, data).map(|()| 0)
            }
            RequestKind::Flush => self.disk.flush().map(|()| 0),
            RequestKind::GetId { data } => self.write_id(data),
            RequestKind::Discard { sector, sectors } => {
                self.disk.discard(*sector, *sectors).map(|()| 0)
            }
            RequestKind::WriteZeroes {
                sector,
                sectors,
                unmap,
            } => self
                .disk
                .write_zeroes(*sector, *sectors, *unmap)
                .map(|()| 0),
        };
        match result {
            Ok(written) => (STATUS_OK, written),
            Err(e) => {
                warn!(
                    "virtio-blk: {} failed on {}: {e}",
                    kind_name(&req.kind),
                    self.disk.path().display()
                );
                (STATUS_IOERR, 0)
            }
        }
    }

    fn write_id(&self, data: &[Segment]) -> io::Result<u32> {
        let id = self.disk.id();
        let mut done = 0usize;
        for seg in data {
            if done == ID_BYTES {
                break;
            }
            let n = (seg.len as usize).min(ID_BYTES - done);
            self.mem
                .write_slice(&id[done..done + n], seg.addr)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            done += n;
        }
        Ok(u32::try_from(done).expect("at most ID_BYTES"))
    }

    /// Writes the status byte and puts the chain on the used ring.
    fn complete(&self, head: u16, status: Option<(GuestAddress, u8)>, written: u32) {
        let mut len = written;
        if let Some((addr, code)) = status {
            match self.mem.write_obj(code, addr) {
                Ok(()) => len += 1,
                Err(e) => {
                    warn!(
                        "virtio-blk: cannot write the status byte at {:#x}: {e}",
                        addr.0
                    );
                    len = 0;
                }
            }
        }
        if let Err(e) = lock(&self.queue).add_used(&self.mem, head, len) {
            warn!("virtio-blk: cannot return descriptor chain {head} to the guest: {e}");
        }
    }

    /// Raises the used-buffer interrupt if the driver wants one.
    fn notify(&self) {
        // Release the queue lock before writing the irqfd: the driver reacts at once by
        // kicking the next request, and the event loop must not find the queue locked.
        let wants = lock(&self.queue).needs_notification(&self.mem);
        match wants {
            Ok(false) => {}
            Ok(true) => self.interrupt.signal_used_queue(),
            Err(e) => {
                warn!("virtio-blk: cannot read the driver's notification index: {e}");
                self.interrupt.signal_used_queue();
            }
        }
    }
}

fn kind_name(kind: &RequestKind) -> &'static str {
    match kind {
        RequestKind::In { .. } => "read",
        RequestKind::Out { .. } => "write",
        RequestKind::Flush => "flush",
        RequestKind::GetId { .. } => "get-id",
        RequestKind::Discard { .. } => "discard",
        RequestKind::WriteZeroes { .. } => "write-zeroes",
    }
}
