//! vCPUs: creation and boot state, and one thread per vCPU running `KVM_RUN`.
//!
//! Each vCPU thread loops: honour the controller's request (run / pause / stop), enter the
//! guest, dispatch the exit (port I/O and MMIO to the buses, stop reasons to the VM). To get
//! a thread out of `KVM_RUN` the controller sets the request and sends it a signal
//! ([`kick_signal`]); the handler sets `immediate_exit` in that thread's `kvm_run`, so a
//! signal that lands just before `KVM_RUN` is not lost. The controller repeats the kick until
//! the thread acknowledges, which makes pausing robust against any remaining race.
//!
//! Snapshots: a paused thread saves its vCPU's state on request ([`VcpuHandle::save_state`],
//! run on the vCPU's own thread, which owns the fd); a restored VM's vCPUs get their state
//! with [`restore_state`] before their threads start.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::Bus;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use log::{debug, error, warn};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::regs::{self, BootProtocol};
use crate::arch::{cpuid, msr, pagewalk};
use crate::exit::{ExitReason, VmEvent};
use crate::memory::GuestMem;
use crate::stats::{ExitKind, VmCounters};

/// Errors of vCPU creation and set-up.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {id}: {source}")]
    Create {
        id: usize,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up vCPU {id} ({what}): {source}")]
    Setup {
        id: usize,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM accepted only {set} of {total} boot MSRs; MSR {index:#x} was refused")]
    Msr {
        id: usize,
        set: usize,
        total: usize,
        index: u32,
    },
    #[error("cannot set up vCPU {0}'s boot page tables: {1}")]
    Regs(usize, regs::RegsError),
    #[error("vCPU {id} of {count}: APIC ids are bytes (at most {max} vCPUs)", max = crate::arch::mptable::MAX_CPUS)]
    TooMany { id: usize, count: usize },
    #[error("cannot start the thread of vCPU {id}: {source}")]
    Spawn { id: usize, source: std::io::Error },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("cannot save the state of vCPU {id} ({what}): {source}")]
    Save {
        id: usize,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot restore the state of vCPU {id} ({what}): {source}")]
    Restore {
        id: usize,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(
        "vCPU {id}: KVM accepted only {set} of {total} saved MSRs; MSR {index:#x} was refused"
    )]
    RestoreMsr {
        id: usize,
        set: usize,
        total: usize,
        index: u32,
    },
    #[error("vCPU {0} is not paused: pause the VM before saving it")]
    NotPaused(usize),
    #[error("vCPU {0} has stopped running the guest; its state cannot be saved")]
    Exited(usize),
    #[error("vCPU {0} did not save its state within {1:?}")]
    SaveTimeout(usize, Duration),
}

/// Most MSRs per `KVM_GET_MSRS` / `KVM_SET_MSRS` call (KVM's `KVM_MAX_MSR_ENTRIES`).
const MSR_BATCH: usize = 256;

/// Everything KVM keeps about one vCPU, as a snapshot holds it. The KVM structures are saved
/// as their raw bytes (kvm-bindings' serde support), so a snapshot belongs to the KVM ABI
/// and host CPU it was taken on (the snapshot's host fingerprint checks that).
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (KVM_GET_XSAVE also works where the guest does not use XSAVE).
    pub xsave: kvm_xsave,
    /// XCR0, where KVM supports it.
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every readable MSR of `KVM_GET_MSR_INDEX_LIST`, in its order (TSC before the TSC
    /// deadline, as KVM needs on restore).
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
}

/// What saving a vCPU needs from the VM.
#[derive(Debug, Clone)]
pub struct SaveCaps {
    /// `KVM_GET_MSR_INDEX_LIST`.
    pub msr_list: Arc<[u32]>,
    /// `KVM_CAP_XCRS`.
    pub xcrs: bool,
}

/// Reads vCPU `id`'s state. The vCPU must be outside `KVM_RUN`, on the thread that runs it;
/// an I/O exit not yet completed is completed first (a `KVM_RUN` with `immediate_exit`),
/// so that the saved registers hold its result.
pub fn save_state(id: usize, fd: &mut VcpuFd, caps: &SaveCaps) -> Result<VcpuState, VcpuError> {
    let err = |what| move |source| VcpuError::Save { id, what, source };
    fd.set_kvm_immediate_exit(1);
    match fd.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(e) => return Err(err("completing the last I/O exit")(e)),
        Ok(exit) => debug!("vcpu{id}: unexpected exit {exit:?} with immediate_exit set"),
    }
    fd.set_kvm_immediate_exit(0);
    Ok(VcpuState {
        cpuid: fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("CPUID"))?
            .as_slice()
            .to_vec(),
        mp_state: fd.get_mp_state().map_err(err("MP state"))?,
        regs: fd.get_regs().map_err(err("registers"))?,
        sregs: fd.get_sregs().map_err(err("special registers"))?,
        xsave: fd.get_xsave().map_err(err("XSAVE"))?,
        xcrs: if caps.xcrs {
            Some(fd.get_xcrs().map_err(err("XCRs"))?)
        } else {
            None
        },
        debugregs: fd.get_debug_regs().map_err(err("debug registers"))?,
        lapic: fd.get_lapic().map_err(err("LAPIC"))?,
        msrs: read_msrs(id, fd, &caps.msr_list)?,
        vcpu_events: fd.get_vcpu_events().map_err(err("events"))?,
    })
}

/// Reads every MSR of `indices` that KVM lets us read (`KVM_GET_MSRS` stops at the first
/// it refuses: that one is skipped and logged).
fn read_msrs(id: usize, fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let err = |source| VcpuError::Save {
        id,
        what: "MSRs",
        source,
    };
    let mut out = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| err(kvm_ioctls::Error::new(libc::E2BIG)))?;
        let read = fd.get_msrs(&mut msrs).map_err(err)?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        if read < batch.len() {
            skipped.push(batch[read]);
            rest = &rest[read + 1..];
        } else {
            rest = &rest[batch.len()..];
        }
    }
    if !skipped.is_empty() && id == 0 {
        debug!("MSRs listed by KVM but not readable, not saved: {skipped:#x?}");
    }
    Ok(out)
}

/// Creates vCPU `id` of a restored VM and gives it `state` (in the order KVM needs: CPUID
/// first, sregs before the LAPIC, MSRs after both, events last).
pub fn restore(vm: &VmFd, id: usize, state: &VcpuState) -> Result<VcpuFd, VcpuError> {
    let fd = vm
        .create_vcpu(id as u64)
        .map_err(|source| VcpuError::Create { id, source })?;
    restore_state(id, &fd, state)?;
    Ok(fd)
}

/// Puts `state` on vCPU `id` (not running).
pub fn restore_state(id: usize, fd: &VcpuFd, state: &VcpuState) -> Result<(), VcpuError> {
    let err = |what| move |source| VcpuError::Restore { id, what, source };
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|_| err("CPUID")(kvm_ioctls::Error::new(libc::E2BIG)))?;
    fd.set_cpuid2(&cpuid).map_err(err("CPUID"))?;
    fd.set_mp_state(state.mp_state).map_err(err("MP state"))?;
    fd.set_regs(&state.regs).map_err(err("registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(err("special registers"))?;
    // SAFETY: `state.xsave` is a whole `kvm_xsave` (the legacy 4 KiB layout KVM_GET_XSAVE
    // returned); KVM reads no more than that from it.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(err("XSAVE"))?;
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(err("XCRs"))?;
    }
    fd.set_debug_regs(&state.debugregs)
        .map_err(err("debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(err("LAPIC"))?;
    for batch in state.msrs.chunks(MSR_BATCH) {
        let msrs = Msrs::from_entries(batch)
            .map_err(|_| err("MSRs")(kvm_ioctls::Error::new(libc::E2BIG)))?;
        let set = fd.set_msrs(&msrs).map_err(err("MSRs"))?;
        if set != batch.len() {
            return Err(VcpuError::RestoreMsr {
                id,
                set,
                total: batch.len(),
                index: batch[set].index,
            });
        }
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(err("events"))?;
    Ok(())
}

/// Real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

thread_local! {
    // The `kvm_run` of the vCPU this thread runs (null when none), for the kick handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    let run = KVM_RUN_PTR.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set while the VcpuFd that
        // owns it is alive on this thread; a volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    static RESULT: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    ONCE.call_once(|| {
        let _ = RESULT.set(register_signal_handler(kick_signal(), handle_kick));
    });
    RESULT
        .get()
        .cloned()
        .unwrap_or(Ok(()))
        .map_err(VcpuError::Signal)
}

/// Creates vCPU `id` and gives it its boot state. Only vCPU 0 gets the entry registers;
/// the others wait for the guest's INIT/SIPI.
#[allow(clippy::too_many_arguments)]
pub fn create(
    vm: &VmFd,
    id: usize,
    count: usize,
    supported_cpuid: &CpuId,
    masks: cpuid::CpuidMasks,
    supported_msrs: &[u32],
    boot: Option<(&GuestMem, BootProtocol, u64, u64)>,
) -> Result<VcpuFd, VcpuError> {
    let setup = |what, source| VcpuError::Setup { id, what, source };
    let fd = vm
        .create_vcpu(id as u64)
        .map_err(|source| VcpuError::Create { id, source })?;

    let mut table = supported_cpuid.clone();
    // APIC ids are bytes; the MP table already held the count to MAX_CPUS (254).
    let too_many = || VcpuError::TooMany { id, count };
    let apic_id = u8::try_from(id).map_err(|_| too_many())?;
    let cpu_count = u8::try_from(count).map_err(|_| too_many())?;
    cpuid::adjust(table.as_mut_slice(), apic_id, cpu_count, masks);
    fd.set_cpuid2(&table).map_err(|e| setup("CPUID", e))?;

    let (entries, skipped) = msr::boot_entries(supported_msrs);
    if !skipped.is_empty() && id == 0 {
        debug!("boot MSRs not offered by this host's KVM, left at reset values: {skipped:#x?}");
    }
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msr {
        id,
        set: 0,
        total: entries.len(),
        index: 0,
    })?;
    let set = fd.set_msrs(&msrs).map_err(|e| setup("MSRs", e))?;
    if set != entries.len() {
        return Err(VcpuError::Msr {
            id,
            set,
            total: entries.len(),
            index: entries[set].index,
        });
    }

    let mut lapic = fd.get_lapic().map_err(|e| setup("LAPIC read", e))?;
    regs::setup_lint(&mut lapic);
    fd.set_lapic(&lapic).map_err(|e| setup("LAPIC", e))?;
    fd.set_fpu(&regs::boot_fpu()).map_err(|e| setup("FPU", e))?;

    if let Some((mem, protocol, entry, boot_info)) = boot {
        let mut sregs = fd.get_sregs().map_err(|e| setup("sregs read", e))?;
        regs::setup_sregs(mem, protocol, &mut sregs).map_err(|e| VcpuError::Regs(id, e))?;
        fd.set_sregs(&sregs).map_err(|e| setup("sregs", e))?;
        fd.set_regs(&regs::boot_regs(protocol, entry, boot_info))
            .map_err(|e| setup("regs", e))?;
    }
    Ok(fd)
}

/// What the controller asks of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

struct ControlState {
    request: Request,
    /// The thread is parked (paused) outside `KVM_RUN`.
    parked: bool,
    /// The thread runs the guest no more (the VM is over, or the thread has ended).
    exited: bool,
    /// The controller asks the parked thread to save its vCPU's state.
    save: bool,
    /// What the thread saved.
    saved: Option<Result<VcpuState, VcpuError>>,
}

struct Control {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        crate::lock(&self.state)
    }
}

/// Everything a vCPU thread needs.
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMem,
    /// Where stop reasons go (the VM controller).
    pub exits: Sender<VmEvent>,
    /// Set just before the first `KVM_RUN` of vCPU 0.
    pub first_run: Arc<OnceLock<Instant>>,
    /// What saving the vCPU's state needs.
    pub save: SaveCaps,
    /// The VM's exit counters and vCPU thread ids.
    pub counters: Arc<VmCounters>,
    /// The guest profile's samples, when the VM is profiled.
    pub profile: Option<Arc<crate::profile::ProfileShared>>,
}

/// The controller's handle on a running vCPU thread.
pub struct VcpuHandle {
    id: usize,
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

const KICK_INTERVAL: Duration = Duration::from_millis(5);

impl VcpuHandle {
    /// Starts the thread of vCPU `id`; a `paused` one parks before its first `KVM_RUN`.
    pub fn spawn(
        id: usize,
        fd: VcpuFd,
        ctx: VcpuContext,
        paused: bool,
    ) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let control = Arc::new(Control {
            state: Mutex::new(ControlState {
                request: if paused { Request::Pause } else { Request::Run },
                parked: false,
                exited: false,
                save: false,
                saved: None,
            }),
            changed: Condvar::new(),
        });
        let thread_control = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let mut vcpu = VcpuThread {
                    id,
                    fd,
                    ctx,
                    control: thread_control.clone(),
                };
                vcpu.run();
                let mut st = thread_control.lock();
                st.exited = true;
                st.parked = false;
                thread_control.changed.notify_all();
            })
            .map_err(|source| VcpuError::Spawn { id, source })?;
        Ok(VcpuHandle {
            id,
            control,
            thread: Some(thread),
        })
    }

    fn request(&self, request: Request) {
        let mut st = self.control.lock();
        if st.request != Request::Stop {
            st.request = request;
        }
        self.control.changed.notify_all();
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            if let Err(e) = t.kill(kick_signal()) {
                debug!("vcpu{}: kick failed (thread gone?): {e}", self.id);
            }
        }
    }

    /// Asks the thread to pause and waits until it is parked outside `KVM_RUN` (or gone).
    pub fn pause(&self, timeout: Duration) -> bool {
        self.request(Request::Pause);
        let deadline = Instant::now() + timeout;
        loop {
            self.kick();
            let st = self.control.lock();
            let (st, _) = self
                .control
                .changed
                .wait_timeout_while(st, KICK_INTERVAL, |s| !s.parked && !s.exited)
                .unwrap_or_else(|p| p.into_inner());
            if st.parked || st.exited {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// Lets a paused thread run the guest again, and waits until it has left its parking
    /// spot (or is gone). Returns false if it did not within `timeout`.
    pub fn resume(&self, timeout: Duration) -> bool {
        self.request(Request::Run);
        let st = self.control.lock();
        let (st, _) = self
            .control
            .changed
            .wait_timeout_while(st, timeout, |s| {
                s.parked && !s.exited && s.request == Request::Run
            })
            .unwrap_or_else(|p| p.into_inner());
        !st.parked || st.exited
    }

    /// Has the paused thread save its vCPU's state, and returns it.
    pub fn save_state(&self, timeout: Duration) -> Result<VcpuState, VcpuError> {
        let mut st = self.control.lock();
        if st.exited {
            return Err(VcpuError::Exited(self.id));
        }
        if !st.parked {
            return Err(VcpuError::NotPaused(self.id));
        }
        st.save = true;
        st.saved = None;
        self.control.changed.notify_all();
        let (mut st, _) = self
            .control
            .changed
            .wait_timeout_while(st, timeout, |s| s.saved.is_none() && !s.exited)
            .unwrap_or_else(|p| p.into_inner());
        st.save = false;
        match st.saved.take() {
            Some(result) => result,
            None if st.exited => Err(VcpuError::Exited(self.id)),
            None => Err(VcpuError::SaveTimeout(self.id, timeout)),
        }
    }

    /// Whether the thread is parked.
    pub fn is_paused(&self) -> bool {
        self.control.lock().parked
    }

    /// Stops the thread and joins it.
    pub fn stop(mut self) {
        {
            let mut st = self.control.lock();
            st.request = Request::Stop;
            self.control.changed.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            // Kick until the thread has left its loop, then join.
            while !self.control.lock().exited {
                if let Err(e) = thread.kill(kick_signal()) {
                    debug!("vcpu{}: kick failed: {e}", self.id);
                    break;
                }
                let st = self.control.lock();
                let _ = self
                    .control
                    .changed
                    .wait_timeout_while(st, KICK_INTERVAL, |s| !s.exited);
            }
            if thread.join().is_err() {
                error!("vcpu{} thread panicked", self.id);
            }
        }
    }
}

/// Outcome of one exit.
enum Next {
    Continue,
    Exit(ExitReason),
}

struct VcpuThread {
    id: usize,
    fd: VcpuFd,
    ctx: VcpuContext,
    control: Arc<Control>,
}

impl VcpuThread {
    fn run(&mut self) {
        self.ctx.counters.register_vcpu_thread(self.id);
        // Before the first KVM_RUN: from here on the thread handles guest-driven exits.
        if let Err(e) = crate::seccomp::confine_vcpu() {
            self.exit(ExitReason::VcpuError {
                cpu: self.id,
                message: e.to_string(),
            });
            return;
        }
        KVM_RUN_PTR.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        self.run_loop();
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Blocks while paused; returns false when the thread must stop.
    fn honour_requests(&mut self) -> bool {
        let mut st = self.control.lock();
        loop {
            match st.request {
                Request::Run => {
                    if st.parked {
                        st.parked = false;
                        self.control.changed.notify_all();
                    }
                    return true;
                }
                Request::Stop => return false,
                Request::Pause => {
                    if !st.parked {
                        st.parked = true;
                        self.control.changed.notify_all();
                    }
                    if st.save {
                        st.save = false;
                        drop(st);
                        let saved = save_state(self.id, &mut self.fd, &self.ctx.save);
                        st = self.control.lock();
                        st.saved = Some(saved);
                        self.control.changed.notify_all();
                        continue;
                    }
                    st = self
                        .control
                        .changed
                        .wait(st)
                        .unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

    fn run_loop(&mut self) {
        loop {
            // Clear before checking requests: a kick after the check re-sets it and makes
            // KVM_RUN return at once.
            self.fd.set_kvm_immediate_exit(0);
            if !self.honour_requests() {
                return;
            }
            if self.id == 0 {
                let _ = self.ctx.first_run.set(Instant::now());
            }
            let next = match self.fd.run() {
                Ok(exit) => {
                    self.ctx.counters.count(exit_kind(&exit));
                    dispatch(self.id, exit, &self.ctx)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.ctx.counters.count(ExitKind::Interrupted);
                    self.sample();
                    Next::Continue
                }
                Err(e) => Next::Exit(ExitReason::VcpuError {
                    cpu: self.id,
                    message: format!("KVM_RUN failed: {e}"),
                }),
            };
            let next = match next {
                Next::Exit(ExitReason::EmulationFailure { .. }) => {
                    Next::Exit(self.emulation_failure())
                }
                other => other,
            };
            if let Next::Exit(reason) = next {
                self.exit(reason);
                return;
            }
        }
    }

    /// Reports `reason` to the VM controller and parks until it stops the thread: the VM
    /// is over.
    fn exit(&self, reason: ExitReason) {
        debug!("vcpu{}: {reason}", self.id);
        let _ = self.ctx.exits.send(VmEvent::Exit(reason));
        let mut st = self.control.lock();
        st.exited = true;
        self.control.changed.notify_all();
        while st.request != Request::Stop {
            self.control.changed.notify_all();
            st = self
                .control
                .changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Counts where the guest is, if the profiler asked this vCPU for a sample.
    fn sample(&self) {
        let Some(profile) = &self.ctx.profile else {
            return;
        };
        if !profile.wants_sample(self.id) {
            return;
        }
        if let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) {
            profile.record(crate::profile::Where::of(
                regs.rip,
                sregs.cr0,
                sregs.cs.selector,
            ));
        }
    }

    /// Details of a `KVM_EXIT_INTERNAL_ERROR`: suberror, RIP and the instruction bytes.
    fn emulation_failure(&mut self) -> ExitReason {
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // member of the union.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let (rip, bytes) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => {
                let linear = s.cs.base.wrapping_add(r.rip);
                let phys = pagewalk::translate(&self.ctx.mem, s.cr0, s.cr3, s.cr4, s.efer, linear);
                let mut bytes = vec![0u8; 15];
                let ok = phys
                    .is_some_and(|p| self.ctx.mem.read_slice(&mut bytes, GuestAddress(p)).is_ok());
                (r.rip, if ok { bytes } else { vec![] })
            }
            _ => (0, vec![]),
        };
        ExitReason::EmulationFailure {
            cpu: self.id,
            suberror,
            rip,
            bytes,
        }
    }
}

/// The kind of `exit`, for the VM's counters.
fn exit_kind(exit: &VcpuExit) -> ExitKind {
    match exit {
        VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => ExitKind::PortIo,
        VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => ExitKind::Mmio,
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => ExitKind::Interrupted,
        _ => ExitKind::Other,
    }
}

fn dispatch(id: usize, exit: VcpuExit, ctx: &VcpuContext) -> Next {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !ctx.pio.read(u64::from(port), data) {
                data.fill(0xff); // nothing there: the bus floats high
            }
            Next::Continue
        }
        VcpuExit::IoOut(port, data) => {
            ctx.pio.write(u64::from(port), data);
            Next::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio.read(addr, data) {
                data.fill(0xff);
            }
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.mmio.write(addr, data);
            Next::Continue
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => Next::Continue,
        VcpuExit::Shutdown => Next::Exit(ExitReason::TripleFault { cpu: id }),
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => Next::Exit(ExitReason::GuestPowerOff),
            KVM_SYSTEM_EVENT_RESET => Next::Exit(ExitReason::GuestReset),
            KVM_SYSTEM_EVENT_CRASH => Next::Exit(ExitReason::GuestCrash { cpu: id }),
            other => {
                warn!("vcpu{id}: ignoring system event {other}");
                Next::Continue
            }
        },
        VcpuExit::InternalError => {
            // Filled in by the caller, which can read the vCPU's registers.
            Next::Exit(ExitReason::EmulationFailure {
                cpu: id,
                suberror: 0,
                rip: 0,
                bytes: vec![],
            })
        }
        VcpuExit::FailEntry(reason, _) => Next::Exit(ExitReason::FailEntry { cpu: id, reason }),
        VcpuExit::Hlt => Next::Exit(ExitReason::VcpuError {
            cpu: id,
            message: "halted with no in-kernel irqchip to wake it".into(),
        }),
        other => Next::Exit(ExitReason::VcpuError {
            cpu: id,
            message: format!("unexpected exit {other:?}"),
        }),
    }
}
