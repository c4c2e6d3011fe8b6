//! The virtio-net header of a guest's TX frame: parsed and checked against any acked
//! features and frame length (offload fields the host tap would act on).
#![no_main]

use devices::virtio::net::header::NetHdr;
use devices::virtio::net::HDR_LEN;
use libfuzzer_sys::fuzz_target;
use podvisor_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let acked = inp.u64();
    let frame_len = usize::from(inp.u16());
    let mut b = [0u8; HDR_LEN];
    let raw = inp.bytes(HDR_LEN);
    b[..raw.len()].copy_from_slice(raw);
    let hdr = NetHdr::parse(&b);
    if let Ok(checked) = hdr.check_tx(acked, frame_len) {
        let _ = checked.to_bytes();
    }
});
