//! A minimal `log` backend: one line per record on stderr, which is the serial console when
//! the agent is PID 1 (see `pid1`). No timestamps: the console log and the shim add theirs.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, _metadata: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        // One write per line so that lines of concurrent threads do not interleave.
        let line = format!(
            "podvisor-agent: {} {}: {}\n",
            record.level(),
            record.target().trim_start_matches("podvisor_agent::"),
            record.args()
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger; `level` is one of error, warn, info, debug, trace.
pub fn init(level: LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
