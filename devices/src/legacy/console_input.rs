//! Event-loop glue that feeds host input (e.g. stdin of `podvisor boot`) to the serial
//! console without busy-looping or dropping bytes.
//!
//! Input is read only while the UART's receive FIFO has room. When it is full, the input fd
//! is taken off the event loop until the guest drains the FIFO (the UART signals
//! `fifo_empty`), so a paste larger than the FIFO arrives whole.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use super::serial::Serial;

/// Feeds `input` into `serial`.
pub struct ConsoleInput {
    serial: Arc<Mutex<Serial>>,
    input: RawFd,
    fifo_empty: EventFd,
    pending: Vec<u8>,
    reading: bool,
    eof: bool,
}

impl ConsoleInput {
    /// `input` must stay open for the life of the subscriber (stdin does). `fifo_empty` is
    /// the event fd given to [`Serial::new`].
    pub fn new(serial: Arc<Mutex<Serial>>, input: RawFd, fifo_empty: EventFd) -> Self {
        Self {
            serial,
            input,
            fifo_empty,
            pending: Vec::new(),
            reading: false,
            eof: false,
        }
    }

    fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let n = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(&self.pending);
        self.pending.drain(..n);
    }

    fn read_input(&mut self) {
        let mut buf = [0u8; 256];
        // SAFETY: reads into a stack buffer of the given length from an fd we were handed.
        let n = unsafe { libc::read(self.input, buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(0) => self.eof = true,
            Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            Err(_) => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::WouldBlock
                    && err.kind() != std::io::ErrorKind::Interrupted
                {
                    warn!("console input: read failed, no more input to the guest: {err}");
                    self.eof = true;
                }
            }
        }
    }

    /// Registers or unregisters the input fd so that we read only when the FIFO has room.
    fn update_interest(&mut self, ops: &mut EventOps) {
        let want = !self.eof && self.pending.is_empty();
        if let Err(e) = crate::set_watched(ops, self.input, want, &mut self.reading) {
            // E.g. stdin is a regular file, which epoll refuses: no interactive input.
            debug!(
                "console input: fd {} not usable with epoll ({e:?}); input disabled",
                self.input
            );
            self.eof = true;
            self.reading = false;
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fifo_empty, EventSet::IN)) {
            warn!("console input: cannot watch the serial FIFO: {e:?}");
            return;
        }
        self.update_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.fifo_empty.as_raw_fd() {
            let _ = self.fifo_empty.read();
        } else if events.fd() == self.input {
            if events.event_set().contains(EventSet::IN) {
                self.read_input();
            } else {
                self.eof = true; // hang-up or error without data
            }
        }
        self.flush_pending();
        self.update_interest(ops);
    }
}
