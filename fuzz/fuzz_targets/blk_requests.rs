//! virtio-blk request chains as a hostile driver writes them (headers, segments, sectors,
//! flags and links), served by the block worker on a small disk file.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    podvisor_fuzz::no_filters();
    let (_dir, blk) = podvisor_fuzz::block_device(data.first().is_some_and(|b| b & 1 == 1));
    let mut drv = podvisor_fuzz::activated(Box::new(blk), u64::MAX);
    podvisor_fuzz::drive_queue(&mut drv, 0, data, Duration::from_millis(2));
});
