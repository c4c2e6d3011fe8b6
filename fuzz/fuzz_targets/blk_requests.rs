//! virtio-blk request chains as a hostile driver writes them (headers, segments, sectors,
//! flags and links), served by the block worker on a small disk file.
#![no_main]

use std::time::Duration;

use devices::virtio::block::{Block, BlockConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    podvisor_fuzz::no_filters();
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let disk = dir.as_path().join("disk");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let blk = Block::new(&BlockConfig {
        path: disk,
        read_only: data.first().is_some_and(|b| b & 1 == 1),
        id: None,
    })
    .unwrap();
    let mut drv = podvisor_fuzz::activated(Box::new(blk), u64::MAX);
    podvisor_fuzz::drive_queue(&mut drv, 0, data, Duration::from_millis(2));
});
