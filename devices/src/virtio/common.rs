//! What every virtio device has, written once.
//!
//! A device is two halves that share its queue kick event fds:
//!
//! * the device side, [`VirtioCommon`], embedded in the [`VirtioDevice`]: name, device
//!   type, queue sizes, kick fds, feature set and subscriber. [`VirtioDevice`]'s identity,
//!   queue, feature, subscriber and (read-only) config-write methods are answered from it
//!   by default, so a device writes only what is its own: config space, activation, reset,
//!   saved state (`common_accessors!` writes the two accessors);
//! * the event-loop side, `HandlerCore`, embedded (as a field `core`) in the device's
//!   subscriber: the kick fds, a wake-up fd and the state that exists only while the driver
//!   runs the device. A subscriber implements `QueueHandler` (what a kick, a wake-up or
//!   another fd of its own does) and gets `HasCore` and its `MutEventSubscriber` from
//!   `impl_subscriber!`. `VirtioCommon::with_handler` builds both halves, and the
//!   device's [`VirtioDevice::subscriber`] is answered from the common part.
//!
//! Rules enforced here for every device, against a possibly hostile guest and without
//! panicking:
//! * a device starts with exactly as many queues as it has ([`VirtioCommon::check_queues`])
//!   and only when it is not running (`HandlerCore::check_idle`);
//! * a reset forgets the running state (the transport forgets the accepted features) and
//!   wakes the subscriber so that it drops on the loop thread whatever it watched for the
//!   running device;
//! * activation wakes the subscriber too, so chains the driver queued before `DRIVER_OK`
//!   are served;
//! * a kick fd is drained before the queue is read: a kick that races with the pass leaves
//!   the fd readable and brings the subscriber back;
//! * the config space is read-only unless the device overrides
//!   [`VirtioDevice::write_config`]: a guest write is logged and ignored.

use std::fmt::Display;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[cfg(doc)]
use super::VirtioDevice;
use super::{ActivateError, DeviceSubscriber, FeatureSet, GuestMem, Interrupt, QueuePosition};

/// The device side every virtio device embeds (see the [module docs](self)).
pub struct VirtioCommon {
    name: String,
    device_type: u32,
    queue_max_sizes: Vec<u16>,
    queue_events: Vec<EventFd>,
    features: FeatureSet,
    /// The device's event-loop subscriber; `None` for a device without one.
    subscriber: Option<DeviceSubscriber>,
}

impl VirtioCommon {
    /// A device called `name` in logs (e.g. `virtio-blk`), of virtio `device_type`, with one
    /// queue (and kick event fd) per `queue_max_sizes` entry, offering `avail_features`.
    pub fn new(
        name: impl Into<String>,
        device_type: u32,
        queue_max_sizes: &[u16],
        avail_features: u64,
    ) -> io::Result<Self> {
        let queue_events = (0..queue_max_sizes.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<_>>()?;
        Ok(Self {
            name: name.into(),
            device_type,
            queue_max_sizes: queue_max_sizes.to_vec(),
            queue_events,
            features: FeatureSet::new(avail_features),
            subscriber: None,
        })
    }

    /// [`VirtioCommon::new`] and the device's subscriber, which `handler` builds around the
    /// event-loop half (watching clones of the same kick fds).
    pub(crate) fn with_handler<H>(
        name: impl Into<String>,
        device_type: u32,
        queue_max_sizes: &[u16],
        avail_features: u64,
        handler: impl FnOnce(HandlerCore<H::Active>) -> H,
    ) -> io::Result<(Self, Arc<Mutex<H>>)>
    where
        H: QueueHandler + MutEventSubscriber + Send + 'static,
    {
        let mut common = Self::new(name, device_type, queue_max_sizes, avail_features)?;
        let kicks = common
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<_>>()?;
        let core = HandlerCore {
            name: common.name.clone(),
            kicks,
            wake: EventFd::new(EFD_NONBLOCK)?,
            active: None,
        };
        let handler = Arc::new(Mutex::new(handler(core)));
        common.subscriber = Some(handler.clone());
        Ok((common, handler))
    }

    /// The device's name in logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The virtio device ID.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The maximum size of each queue.
    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    /// One kick event fd per queue.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// What the device offers and what the driver accepted.
    pub fn features(&self) -> &FeatureSet {
        &self.features
    }

    /// Mutable access to the feature set.
    pub fn features_mut(&mut self) -> &mut FeatureSet {
        &mut self.features
    }

    /// The device's event-loop subscriber (one that watches nothing for a device built
    /// without one).
    pub fn subscriber(&self) -> DeviceSubscriber {
        match &self.subscriber {
            Some(s) => s.clone(),
            None => Arc::new(Mutex::new(NoEvents)),
        }
    }

    /// [`ActivateError::QueueCount`] unless `queues` has one queue per queue of the device.
    pub fn check_queues(&self, queues: &[Queue]) -> Result<(), ActivateError> {
        if queues.len() == self.queue_max_sizes.len() {
            Ok(())
        } else {
            Err(ActivateError::QueueCount {
                expected: self.queue_max_sizes.len(),
                got: queues.len(),
            })
        }
    }

    /// A guest write to a read-only config space: logged, ignored.
    pub fn ignore_config_write(&self, offset: u64, data: &[u8]) {
        warn!(
            "{}: guest wrote {} bytes at config offset {offset:#x}; the config space is read-only, ignored",
            self.name,
            data.len()
        );
    }
}

/// The subscriber of a device that has no events of its own.
struct NoEvents;

impl MutEventSubscriber for NoEvents {
    fn init(&mut self, _ops: &mut EventOps) {}
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
}

/// [`VirtioDevice::common`] and [`VirtioDevice::common_mut`] from the device's field
/// `$field`, inside its `impl VirtioDevice`.
macro_rules! common_accessors {
    ($field:ident) => {
        fn common(&self) -> &$crate::virtio::VirtioCommon {
            &self.$field
        }

        fn common_mut(&mut self) -> &mut $crate::virtio::VirtioCommon {
            &mut self.$field
        }
    };
}
pub(crate) use common_accessors;

/// What a running device's subscriber has saved positions for.
pub(crate) trait ActiveState {
    /// Positions in the device's queues, in queue order.
    fn queue_positions(&self) -> Vec<QueuePosition>;
}

/// The event-loop side every device's subscriber embeds (see the [module docs](self)):
/// the kick fds, a wake-up fd and `A`, what exists only while the device runs.
pub(crate) struct HandlerCore<A> {
    name: String,
    kicks: Vec<EventFd>,
    wake: EventFd,
    active: Option<A>,
}

/// Which of the core's fds an event is for.
enum Source {
    Kick(usize),
    WakeUp,
    Other,
}

impl<A> HandlerCore<A> {
    /// The device's name in logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The running state, if the driver runs the device.
    pub fn active(&self) -> Option<&A> {
        self.active.as_ref()
    }

    /// Mutable access to the running state.
    pub fn active_mut(&mut self) -> Option<&mut A> {
        self.active.as_mut()
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// [`ActivateError::AlreadyActive`] if the device runs.
    pub fn check_idle(&self) -> Result<(), ActivateError> {
        if self.is_active() {
            Err(ActivateError::AlreadyActive)
        } else {
            Ok(())
        }
    }

    /// Starts serving the queues (at `DRIVER_OK`) and wakes the subscriber to serve what
    /// the driver queued before.
    pub fn activate(&mut self, active: A) {
        self.active = Some(active);
        self.wake_up();
    }

    /// Stops the device (the driver reset it): returns the running state for the caller to
    /// dispose of (outside the subscriber's lock if that blocks) and wakes the subscriber.
    pub fn reset(&mut self) -> Option<A> {
        let stopped = self.active.take();
        self.wake_up();
        stopped
    }

    /// Makes the subscriber run its wake-up handling on the loop thread.
    pub fn wake_up(&self) {
        if let Err(e) = self.wake.write(1) {
            warn!("{}: cannot wake the event loop: {e}", self.name);
        }
    }

    /// Kicks queue `q` again: a pass that spent its budget comes back after the loop's
    /// other subscribers had their turn.
    pub fn rekick(&self, q: usize) {
        if let Some(Err(e)) = self.kicks.get(q).map(|k| k.write(1)) {
            warn!("{}: cannot re-arm the kick of queue {q}: {e}", self.name);
        }
    }

    /// Watches the kick fds and the wake-up fd.
    fn watch(&self, ops: &mut EventOps) {
        for (q, evt) in self.kicks.iter().chain([&self.wake]).enumerate() {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                error!(
                    "{}: cannot watch event fd {q} (queue kicks, then wake-up), the device will not work: {e:?}",
                    self.name
                );
            }
        }
    }

    /// Says which fd `events` is for and drains it if it is one of the core's.
    fn take(&self, events: &Events) -> Source {
        let fd = events.fd();
        let (source, evt) = if let Some(q) = self.kicks.iter().position(|k| k.as_raw_fd() == fd) {
            (Source::Kick(q), &self.kicks[q])
        } else if fd == self.wake.as_raw_fd() {
            (Source::WakeUp, &self.wake)
        } else {
            return Source::Other;
        };
        if let Err(e) = evt.read() {
            if e.kind() != io::ErrorKind::WouldBlock {
                warn!("{}: cannot read an event fd: {e}", self.name);
            }
        }
        source
    }
}

impl<A: ActiveState> HandlerCore<A> {
    /// Positions in the queues, while the device runs.
    pub fn queue_positions(&self) -> Option<Vec<QueuePosition>> {
        self.active.as_ref().map(A::queue_positions)
    }
}

/// A subscriber's [`HandlerCore`] (from `impl_subscriber!`).
pub(crate) trait HasCore {
    /// What exists only while the device runs.
    type Active;

    fn core(&self) -> &HandlerCore<Self::Active>;

    fn core_mut(&mut self) -> &mut HandlerCore<Self::Active>;
}

/// A device's event-loop subscriber, as the skeleton in this module drives it: the core's
/// fds are watched, drained and dispatched here; the device says what each one means.
pub(crate) trait QueueHandler: HasCore {
    /// Queue `q` was kicked (its fd is already drained).
    fn kicked(&mut self, q: usize, ops: &mut EventOps);

    /// The device was activated or reset, or asked to come back. By default, what a kick
    /// of every queue does.
    fn woken(&mut self, ops: &mut EventOps) {
        for q in 0..self.core().kicks.len() {
            self.kicked(q, ops);
        }
    }

    /// An event on an fd of the subscriber's own (neither a kick nor the wake-up).
    fn other_event(&mut self, _events: Events, _ops: &mut EventOps) {}

    /// Watches the subscriber's own fds, after the core's.
    fn watch_more(&mut self, _ops: &mut EventOps) {}

    /// Runs after every event (registration changes that depend on the state).
    fn after_event(&mut self, _ops: &mut EventOps) {}
}

/// `MutEventSubscriber::init` of a [`QueueHandler`].
pub(crate) fn init<H: QueueHandler>(handler: &mut H, ops: &mut EventOps) {
    handler.core().watch(ops);
    handler.watch_more(ops);
}

/// `MutEventSubscriber::process` of a [`QueueHandler`].
pub(crate) fn process<H: QueueHandler>(handler: &mut H, events: Events, ops: &mut EventOps) {
    match handler.core().take(&events) {
        Source::Kick(q) => handler.kicked(q, ops),
        Source::WakeUp => handler.woken(ops),
        Source::Other => handler.other_event(events, ops),
    }
    handler.after_event(ops);
}

/// Implements [`HasCore`] (from the field `core`, running state `$active`) and
/// `MutEventSubscriber` for a [`QueueHandler`].
macro_rules! impl_subscriber {
    ($handler:ty, $active:ty) => {
        impl $crate::virtio::common::HasCore for $handler {
            type Active = $active;

            fn core(&self) -> &$crate::virtio::common::HandlerCore<$active> {
                &self.core
            }

            fn core_mut(&mut self) -> &mut $crate::virtio::common::HandlerCore<$active> {
                &mut self.core
            }
        }

        impl event_manager::MutEventSubscriber for $handler {
            fn init(&mut self, ops: &mut event_manager::EventOps) {
                $crate::virtio::common::init(self, ops)
            }

            fn process(
                &mut self,
                events: event_manager::Events,
                ops: &mut event_manager::EventOps,
            ) {
                $crate::virtio::common::process(self, events, ops)
            }
        }
    };
}
pub(crate) use impl_subscriber;

/// The running state of a device whose queues are served on the event loop.
pub(crate) struct ActiveQueues {
    name: String,
    pub mem: GuestMem,
    pub interrupt: Arc<Interrupt>,
    /// In the device's queue order.
    pub queues: Vec<Queue>,
    /// The driver broke a queue: nothing more is done until a reset.
    pub broken: bool,
}

impl ActiveQueues {
    pub fn new<A>(
        core: &HandlerCore<A>,
        mem: GuestMem,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Self {
        Self {
            name: core.name.clone(),
            mem,
            interrupt,
            queues,
            broken: false,
        }
    }

    /// Returns chain `head` of queue `q` to the guest with `len` bytes written.
    pub fn add_used(&mut self, q: usize, head: u16, len: u32) {
        if let Err(e) = self.queues[q].add_used(&self.mem, head, len) {
            warn!(
                "{}: cannot return chain {head} of queue {q} to the guest: {e}",
                self.name
            );
        }
    }

    /// Raises the used-buffer interrupt if the driver wants one.
    pub fn notify(&mut self, q: usize) {
        match self.queues[q].needs_notification(&self.mem) {
            Ok(false) => {}
            Ok(true) => self.interrupt.signal_used_queue(),
            Err(e) => {
                warn!(
                    "{}: cannot read the driver's notification index: {e}",
                    self.name
                );
                self.interrupt.signal_used_queue();
            }
        }
    }

    /// The driver broke a queue: the device needs a reset. Returns `false` (no more work),
    /// for passes that say whether work is left.
    pub fn fail(&mut self, why: impl Display) -> bool {
        error!("{}: {why}; the device needs a reset", self.name);
        self.broken = true;
        self.interrupt.set_needs_reset();
        false
    }
}

impl ActiveState for ActiveQueues {
    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.queues.iter().map(QueuePosition::of).collect()
    }
}
