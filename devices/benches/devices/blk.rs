//! virtio-blk on a temp file: IN/OUT requests as Linux lays them out (header, data segments
//! of at most `size_max`, status byte), one in flight.

use devices::virtio::block::{Block, BlockConfig, QUEUE_SIZE, SECTOR_SIZE, SIZE_MAX};
use devices::virtio::features::{bit, VIRTIO_F_VERSION_1};
use devices::virtio::test_utils::{len32, Buf, MmioDriver};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::file::{fill, pattern, FileIo, RawFile};
use super::{Dir, TIMEOUT};

/// Guest memory: rings, a 1 MiB data buffer and the header/status bytes.
const MEM: usize = 8 << 20;

/// The device and its driver.
pub struct BlkDevice {
    drv: MmioDriver,
    header: GuestAddress,
    data: GuestAddress,
    status: GuestAddress,
    /// The chain being built (reused).
    bufs: Vec<Buf>,
    _img: TempFile,
}

/// The device on a filled temp file, and the raw baseline on the same file.
pub fn setup() -> (BlkDevice, RawFile) {
    let img = TempFile::new().expect("temp file");
    fill(img.as_file());
    let block = Block::new(&BlockConfig {
        path: img.as_path().into(),
        read_only: false,
        id: None,
    })
    .expect("virtio-blk device");
    let mut drv = MmioDriver::new(Box::new(block), MEM);
    drv.activate(
        bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_FLUSH),
        QUEUE_SIZE,
    );
    let header = drv.alloc(16);
    let status = drv.alloc(1);
    let data = drv.alloc(1 << 20);
    drv.write_mem(data, &pattern(1 << 20));
    let raw = RawFile::new(img.as_file().try_clone().expect("dup the image fd"));
    let dev = BlkDevice {
        drv,
        header,
        data,
        status,
        bufs: Vec::new(),
        _img: img,
    };
    (dev, raw)
}

impl FileIo for BlkDevice {
    /// One request of `size` bytes at byte `offset`, waited for.
    fn io(&mut self, dir: Dir, offset: u64, size: usize) {
        let req_type = match dir {
            Dir::Read => VIRTIO_BLK_T_IN,
            Dir::Write => VIRTIO_BLK_T_OUT,
        };
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..].copy_from_slice(&(offset / SECTOR_SIZE).to_le_bytes());
        self.drv.write_mem(self.header, &h);
        let bufs = &mut self.bufs;
        bufs.clear();
        bufs.push((self.header, 16, false));
        let size = len32(size);
        for start in (0..size).step_by(SIZE_MAX as usize) {
            let len = SIZE_MAX.min(size - start);
            let addr = GuestAddress(self.data.0 + u64::from(start));
            bufs.push((addr, len, dir == Dir::Read));
        }
        bufs.push((self.status, 1, true));
        self.drv.submit(0, bufs);
        self.drv.wait_used_irq(0, TIMEOUT);
        let status: u8 = self.drv.mem.read_obj(self.status).expect("status byte");
        assert_eq!(
            u32::from(status),
            VIRTIO_BLK_S_OK,
            "virtio-blk request failed"
        );
    }
}
