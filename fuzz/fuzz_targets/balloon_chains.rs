//! virtio-balloon chains as a hostile driver writes them, on the inflate, deflate or free
//! page reporting queue (chosen by the first byte): frame numbers and reported ranges
//! anywhere, descriptors of either direction, loops and indirect tables.
#![no_main]

use std::time::Duration;

use devices::virtio::balloon::Balloon;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    podvisor_fuzz::no_filters();
    let Some((&q, rest)) = data.split_first() else {
        return;
    };
    let mut drv = podvisor_fuzz::activated(Box::new(Balloon::new().unwrap()), u64::MAX);
    podvisor_fuzz::drive_queue(&mut drv, usize::from(q % 3), rest, Duration::from_millis(2));
});
