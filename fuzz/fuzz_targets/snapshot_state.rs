//! A snapshot's `state` file: header, version, length, CRC, then the JSON state.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::{decode, SnapshotState};

fuzz_target!(|data: &[u8]| {
    if let Ok(payload) = decode(Path::new("state"), data) {
        let _ = serde_json::from_slice::<SnapshotState>(payload);
    }
    // The JSON alone, to reach past the CRC.
    let _ = serde_json::from_slice::<SnapshotState>(data);
});
