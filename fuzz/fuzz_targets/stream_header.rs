//! The header of a stdio stream connection as the agent reads it (magic, kind, ids).
#![no_main]

use libfuzzer_sys::fuzz_target;
use podvisor_agent_protocol::stream::StreamHeader;

fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    let _ = StreamHeader::read_from(&mut reader);
});
