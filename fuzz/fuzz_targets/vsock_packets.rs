//! virtio-vsock TX packets from the guest (headers, operations, ports, credit, payloads)
//! through the connection state machine and the hybrid vsock's Unix sockets.
#![no_main]

use std::time::Duration;

use devices::virtio::vsock::Vsock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    podvisor_fuzz::no_filters();
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let uds = dir.as_path().join("v.sock");
    // A host listener on port 1024, so connection requests reach a live socket.
    let _listener = std::os::unix::net::UnixListener::bind(dir.as_path().join("v.sock_1024"));
    let vsock = Vsock::new(3, &uds).unwrap();
    let mut drv = podvisor_fuzz::activated(Box::new(vsock), u64::MAX);
    // The guest's RX buffers, so replies can flow.
    for _ in 0..4 {
        let addr = drv.alloc(4096);
        drv.submit(0, &[(addr, 4096, true)]);
    }
    podvisor_fuzz::drive_queue(&mut drv, 1, data, Duration::from_millis(2));
});
