//! The guest console: a 16550A UART (vm-superio) on port 0x3f8, IRQ 4 via irqfd.
//!
//! Output bytes go to a sink (stdout, a file) and into a [`ConsoleLog`]: a bounded tail of
//! the console kept in memory, so that errors can show what the guest said last, and a
//! watch for the kernel's panic line, so that a panic-then-reset is not mistaken for a
//! clean stop.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use log::warn;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Port of COM1.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Length of a 16550's register window.
pub const SERIAL_PORT_LEN: u64 = 8;
/// ISA IRQ line of COM1.
pub const SERIAL_IRQ: u32 = 4;

/// An interrupt line backed by an event fd (registered with KVM as an irqfd).
pub struct IrqTrigger(EventFd);

impl IrqTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The event fd to register with KVM.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

const TAIL_CAPACITY: usize = 16 * 1024;
const PANIC_MARKER: &str = "Kernel panic - not syncing: ";

/// What the guest printed last, and whether its kernel panicked.
#[derive(Debug, Default)]
pub struct ConsoleLog {
    tail: VecDeque<u8>,
    line: Vec<u8>,
    panic: Option<String>,
    bytes: u64,
}

impl ConsoleLog {
    /// A shared, empty log.
    pub fn shared() -> Arc<Mutex<ConsoleLog>> {
        Arc::new(Mutex::new(ConsoleLog::default()))
    }

    /// Records bytes the guest wrote.
    pub fn record(&mut self, bytes: &[u8]) {
        self.bytes += bytes.len() as u64;
        for &b in bytes {
            if self.tail.len() == TAIL_CAPACITY {
                self.tail.pop_front();
            }
            self.tail.push_back(b);
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < 512 {
                self.line.push(b);
            }
        }
    }

    fn end_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line);
        if self.panic.is_none() {
            if let Some(pos) = line.find(PANIC_MARKER) {
                let reason = line[pos + PANIC_MARKER.len()..].trim_end();
                self.panic = Some(reason.to_string());
            }
        }
        self.line.clear();
    }

    /// The reason of the guest kernel's panic, if it printed one.
    pub fn panic_reason(&self) -> Option<&str> {
        self.panic.as_deref()
    }

    /// The last `n` lines the guest printed (lossy UTF-8).
    pub fn tail_lines(&self, n: usize) -> String {
        let (a, b) = self.tail.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Total bytes the guest has written to the console.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The UART's output: a sink plus the console log.
pub struct ConsoleOut {
    sink: Box<dyn Write + Send>,
    log: Arc<Mutex<ConsoleLog>>,
    sink_failed: bool,
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(buf);
        // A broken sink (closed pipe, full disk) must not stop the guest: keep the log going.
        if !self.sink_failed {
            if let Err(e) = self.sink.write_all(buf) {
                warn!("console: output sink failed, guest output is only kept in memory now: {e}");
                self.sink_failed = true;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.sink_failed {
            let _ = self.sink.flush();
        }
        Ok(())
    }
}

/// Signals an event fd when the guest has drained the receive FIFO, so that buffered host
/// input can be queued again.
pub struct InputEvents(Option<EventFd>);

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(evt) = &self.0 {
            let _ = evt.write(1);
        }
    }
}

/// The UART's registers and receive FIFO, as a snapshot holds them (vm-superio's
/// `SerialState`, which has no serde support of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialPersist {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialPersist {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialPersist> for SerialState {
    fn from(s: &SerialPersist) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Saved UART state that cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[error("invalid saved serial state: {0}")]
pub struct SerialRestoreError(String);

/// The serial console device.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, InputEvents, ConsoleOut>,
}

impl Serial {
    /// A UART raising `irq` and writing to `sink` and `log`. `fifo_empty` (if any) is
    /// signalled when the guest has read all queued input.
    pub fn new(
        irq: IrqTrigger,
        sink: Box<dyn Write + Send>,
        log: Arc<Mutex<ConsoleLog>>,
        fifo_empty: Option<EventFd>,
    ) -> Self {
        let out = ConsoleOut {
            sink,
            log,
            sink_failed: false,
        };
        Self {
            uart: vm_superio::Serial::with_events(irq, InputEvents(fifo_empty), out),
        }
    }

    /// [`Serial::new`] with saved registers and receive FIFO (a pending interrupt is
    /// raised again).
    pub fn from_state(
        state: &SerialPersist,
        irq: IrqTrigger,
        sink: Box<dyn Write + Send>,
        log: Arc<Mutex<ConsoleLog>>,
        fifo_empty: Option<EventFd>,
    ) -> Result<Self, SerialRestoreError> {
        let out = ConsoleOut {
            sink,
            log,
            sink_failed: false,
        };
        let uart = vm_superio::Serial::from_state(
            &SerialState::from(state),
            irq,
            InputEvents(fifo_empty),
            out,
        )
        .map_err(|e| SerialRestoreError(format!("{e:?}")))?;
        Ok(Self { uart })
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let n = bytes.len().min(room);
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                warn!("serial: cannot queue console input: {e:?}");
                0
            }
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// The UART's register state (for snapshots).
    pub fn state(&self) -> SerialPersist {
        self.uart.state().into()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The register: an offset in the port's 8 bytes (the guest picks it).
        match u8::try_from(offset) {
            Ok(reg) if data.len() == 1 && offset < SERIAL_PORT_LEN => data[0] = self.uart.read(reg),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let reg = match u8::try_from(offset) {
            Ok(reg) if data.len() == 1 && offset < SERIAL_PORT_LEN => reg,
            _ => return,
        };
        if let Err(e) = self.uart.write(reg, data[0]) {
            warn!("serial: write to register {offset} failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_sink_and_log_and_panic_is_seen() {
        let sink = Sink::default();
        let log = ConsoleLog::shared();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(
            IrqTrigger::new(evt.try_clone().unwrap()),
            Box::new(sink.clone()),
            log.clone(),
            None,
        );
        let text = "hello\nKernel panic - not syncing: VFS: Unable to mount root fs\n";
        for b in text.bytes() {
            serial.write(0, &[b]);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), text.as_bytes());
        let log = log.lock().unwrap();
        assert_eq!(log.panic_reason(), Some("VFS: Unable to mount root fs"));
        assert_eq!(
            log.tail_lines(1),
            "Kernel panic - not syncing: VFS: Unable to mount root fs"
        );
        assert_eq!(log.bytes(), text.len() as u64);
    }

    #[test]
    fn input_raises_the_interrupt_when_enabled() {
        let log = ConsoleLog::shared();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(
            IrqTrigger::new(evt.try_clone().unwrap()),
            Box::new(io::sink()),
            log,
            None,
        );
        serial.write(1, &[0x01]); // IER: received-data-available interrupt
        assert_eq!(serial.enqueue_input(b"ls\n"), 3);
        assert!(evt.read().unwrap() >= 1);
        let mut b = [0];
        serial.read(0, &mut b);
        assert_eq!(b, [b'l']);
    }

    #[test]
    fn state_survives_save_load_save() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let new = |state: Option<&SerialPersist>| {
            let irq = IrqTrigger::new(evt.try_clone().unwrap());
            let log = ConsoleLog::shared();
            match state {
                Some(s) => Serial::from_state(s, irq, Box::new(io::sink()), log, None).unwrap(),
                None => Serial::new(irq, Box::new(io::sink()), log, None),
            }
        };
        let mut serial = new(None);
        serial.write(3, &[0x03]); // LCR: 8N1
        serial.write(7, &[0x5a]); // scratch
        serial.write(1, &[0x01]); // IER: received data available
        serial.enqueue_input(b"ab");
        let saved = serial.state();
        let json = serde_json::to_string(&saved).unwrap();
        let loaded: SerialPersist = serde_json::from_str(&json).unwrap();
        while evt.read().is_ok() {}
        let mut restored = new(Some(&loaded));
        assert_eq!(restored.state(), saved);
        assert_eq!(
            evt.read().unwrap(),
            1,
            "pending input interrupt raised again"
        );
        let mut b = [0];
        restored.read(0, &mut b);
        assert_eq!(b, [b'a']);
        let bad = SerialPersist {
            in_buffer: vec![0; 4096],
            ..saved
        };
        assert!(Serial::from_state(
            &bad,
            IrqTrigger::new(evt.try_clone().unwrap()),
            Box::new(io::sink()),
            ConsoleLog::shared(),
            None
        )
        .is_err());
    }

    #[test]
    fn tail_is_bounded() {
        let mut log = ConsoleLog::default();
        for i in 0..5000 {
            log.record(format!("line {i}\n").as_bytes());
        }
        assert!(log.tail.len() <= TAIL_CAPACITY);
        assert_eq!(log.tail_lines(2), "line 4998\nline 4999");
    }
}
