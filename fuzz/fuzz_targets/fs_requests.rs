//! FUSE requests as the guest sends them over virtio-fs (any opcode, header and arguments),
//! served by the share's worker on a small directory tree.
#![no_main]

use devices::virtio::fs::test_client::FuseClient;
use devices::virtio::fs::{Fs, ShareConfig, ShareOptions};
use libfuzzer_sys::fuzz_target;
use podvisor_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    podvisor_fuzz::no_filters();
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    std::fs::create_dir(dir.as_path().join("d")).unwrap();
    std::fs::write(dir.as_path().join("d/f"), b"hello").unwrap();
    let config = ShareConfig::new("fuzz", dir.as_path(), ShareOptions::default()).unwrap();
    let mut c = FuseClient::new(Fs::new(config).unwrap());
    c.init();
    let mut inp = Input(data);
    // Up to 4 requests: a length, then that many bytes of request (header included), and
    // the size of the reply buffer the guest offers.
    for _ in 0..4 {
        if inp.0.is_empty() {
            break;
        }
        let len = usize::from(inp.u16() % 4096);
        let reply = u32::from(inp.u16());
        let request = inp.bytes(len).to_vec();
        let _ = c.send_raw(1, &[&request], &[reply]);
    }
});
