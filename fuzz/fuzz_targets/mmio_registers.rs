//! MMIO register accesses in any order and with any values (the transport's state machine:
//! status, feature selection, queue set-up, notifies, config space), on a virtio-blk device.
#![no_main]

use devices::virtio::test_utils::MmioDriver;
use libfuzzer_sys::fuzz_target;
use podvisor_fuzz::{Input, MEM};

fuzz_target!(|data: &[u8]| {
    podvisor_fuzz::no_filters();
    let (_dir, blk) = podvisor_fuzz::block_device(false);
    let mut drv = MmioDriver::new(Box::new(blk), MEM);
    let mut inp = Input(data);
    while !inp.0.is_empty() {
        let op = inp.u8();
        // Registers and a little of the config space beyond them.
        let offset = u64::from(inp.u16() % 0x180);
        if op & 1 == 0 {
            let _ = drv.read32(offset);
        } else {
            drv.write32(offset, inp.u32());
        }
        if op & 0x80 != 0 {
            drv.run_events(0);
        }
    }
});
