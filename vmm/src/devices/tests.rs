//! The devices at the seam: a guest memory and a split virtqueue laid out here, register accesses
//! and requests in, image bytes and used-ring entries out.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::block::{Block, BlockError, MAX_REQUEST_BYTES, QUEUE_SIZE, SEG_MAX, SIZE_MAX};
use super::mmio::{Interrupt, MmioTransport, MMIO_MAGIC};

const RAM: u64 = 0x20_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x8000;
const DATA: u64 = 0x10000;
const STATUS: u64 = 0xf000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

#[derive(Default)]
struct Count(AtomicUsize);

impl Interrupt for Count {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Guest {
    mem: GuestMemoryMmap,
    dev: MmioTransport<Block>,
    irqs: Arc<Count>,
    avail_idx: u16,
    image: tempfile::NamedTempFile,
}

fn image(sectors: u64) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let bytes: Vec<u8> = (0..sectors * 512)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    f.write_all(&bytes).unwrap();
    f
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(RAM).unwrap())]).unwrap()
}

impl Guest {
    /// A device on a fresh 64-sector image, not yet initialised by the driver.
    fn raw(read_only: bool) -> Self {
        let image = image(64);
        let mem = memory();
        let irqs = Arc::new(Count::default());
        let block = Block::open(image.path(), read_only).unwrap();
        let dev = MmioTransport::new(block, mem.clone(), irqs.clone());
        Self {
            mem,
            dev,
            irqs,
            avail_idx: 0,
            image,
        }
    }

    /// A device the driver has brought up as Linux does.
    fn new(read_only: bool) -> Self {
        let mut g = Self::raw(read_only);
        g.w(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        g.w(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        let features = g.features();
        g.w(0x24, 0);
        g.w(0x20, u32::try_from(features & 0xffff_ffff).unwrap());
        g.w(0x24, 1);
        g.w(0x20, u32::try_from(features >> 32).unwrap());
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        g.w(0x70, s);
        assert_eq!(g.r(0x70), s);
        g.setup_queue();
        g.w(0x70, s | VIRTIO_CONFIG_S_DRIVER_OK);
        assert!(g.dev.is_live());
        g
    }

    fn setup_queue(&mut self) {
        self.w(0x30, 0);
        self.w(0x38, u32::from(QUEUE_SIZE));
        self.w(0x80, u32::try_from(DESC).unwrap());
        self.w(0x84, 0);
        self.w(0x90, u32::try_from(AVAIL).unwrap());
        self.w(0x94, 0);
        self.w(0xa0, u32::try_from(USED).unwrap());
        self.w(0xa4, 0);
        self.w(0x44, 1);
        assert_eq!(self.r(0x44), 1);
    }

    fn features(&mut self) -> u64 {
        self.w(0x14, 0);
        let low = self.r(0x10);
        self.w(0x14, 1);
        u64::from(low) | (u64::from(self.r(0x10)) << 32)
    }

    fn r(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(&mut self, offset: u64, value: u32) {
        self.dev.write(offset, &value.to_le_bytes());
    }

    fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).unwrap();
    }

    /// Lays `descs` (addr, len, flags without NEXT) out as one chain from index `head`.
    fn chain(&self, head: u16, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = u16::try_from(i).unwrap();
            let last = usize::from(i) + 1 == descs.len();
            let flags = if last { flags } else { flags | F_NEXT };
            self.desc(head + i, addr, len, flags, head + i + 1);
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Offers the chain at `head` and notifies queue 0; returns the used entry it produced.
    fn submit(&mut self, head: u16) -> (u32, u32) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        let used_before: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        self.w(0x50, 0);
        let used_after: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(
            used_after,
            used_before.wrapping_add(1),
            "one chain, one entry"
        );
        let entry = USED + 4 + 8 * u64::from(used_before % QUEUE_SIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(entry)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(entry + 4)).unwrap();
        (id, len)
    }

    /// A request of `kind` at `sector` with one data buffer; returns (used len, status).
    fn request(&mut self, kind: u32, sector: u64, data_len: u32, data_flags: u16) -> (u32, u8) {
        self.header(kind, sector);
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        self.chain(
            0,
            &[
                (HDR, 16, 0),
                (DATA, data_len, data_flags),
                (STATUS, 1, F_WRITE),
            ],
        );
        let (id, len) = self.submit(0);
        assert_eq!(id, 0);
        (len, self.status_byte())
    }

    fn status_byte(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.image.as_file().read_exact_at(&mut b, offset).unwrap();
        b
    }
}

fn s(status: u32) -> u8 {
    u8::try_from(status).unwrap()
}

#[test]
fn register_file_identifies_a_version_2_block_device() {
    let mut g = Guest::raw(false);
    assert_eq!(g.r(0x00), MMIO_MAGIC);
    assert_eq!(g.r(0x04), 2);
    assert_eq!(g.r(0x08), 2, "virtio block");
    let f = g.features();
    assert_ne!(f & (1 << 32), 0, "VIRTIO_F_VERSION_1");
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(g.r(0x34), u32::from(QUEUE_SIZE));
    // Capacity in configuration space, read bytewise as a guest may.
    let mut cap = [0u8; 8];
    for (i, b) in cap.iter_mut().enumerate() {
        let mut one = [0u8; 1];
        g.dev.read(0x100 + u64::try_from(i).unwrap(), &mut one);
        *b = one[0];
    }
    assert_eq!(u64::from_le_bytes(cap), 64);
    // Unaligned or odd-width register reads are zero, not a panic.
    let mut two = [0xffu8; 2];
    g.dev.read(0x02, &mut two);
    assert_eq!(two, [0, 0]);
    g.dev.read(0x1000_0000, &mut two);
    g.dev.write(0x51, &[1, 2, 3]);
    // A queue that does not exist has no size and cannot be readied.
    g.w(0x30, 7);
    assert_eq!(g.r(0x34), 0);
    g.w(0x44, 1);
    assert_eq!(g.r(0x44), 0);
}

#[test]
fn segment_limits_are_advertised_and_keep_linux_under_the_request_bound() {
    let mut g = Guest::raw(false);
    let f = g.features();
    assert_ne!(f & (1 << 1), 0, "VIRTIO_BLK_F_SIZE_MAX");
    assert_ne!(f & (1 << 2), 0, "VIRTIO_BLK_F_SEG_MAX");
    let mut c = [0u8; 4];
    g.dev.read(0x108, &mut c);
    assert_eq!(u32::from_le_bytes(c), SIZE_MAX);
    g.dev.read(0x10c, &mut c);
    assert_eq!(u32::from_le_bytes(c), SEG_MAX);
    assert_eq!(
        SEG_MAX + 2,
        u32::from(QUEUE_SIZE),
        "header and status fit with seg_max"
    );
    assert!(u64::from(SEG_MAX) * u64::from(SIZE_MAX) <= MAX_REQUEST_BYTES);
    // Past the fields we fill, configuration space reads as zero.
    g.dev.read(0x110, &mut c);
    assert_eq!(c, [0; 4]);
    g.dev.read(0xffc, &mut c);
    assert_eq!(c, [0; 4]);
}

#[test]
fn read_only_disk_says_so() {
    let mut g = Guest::raw(true);
    assert_ne!(g.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert!(g.dev.device().read_only());
}

#[test]
fn features_without_version_1_are_refused() {
    let mut g = Guest::raw(false);
    g.w(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    g.w(0x24, 0);
    g.w(0x20, 1 << VIRTIO_BLK_F_FLUSH);
    let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
    g.w(0x70, s);
    assert_eq!(g.r(0x70) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK does not bring the device up.
    g.w(
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert!(!g.dev.is_live());
}

#[test]
fn features_the_device_does_not_offer_are_refused() {
    let mut g = Guest::raw(false);
    g.w(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    g.w(0x24, 1);
    g.w(0x20, 1 | (1 << 2)); // VERSION_1 and RING_PACKED
    g.w(
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(g.r(0x70) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // Nor does asking for FEATURES_OK and DRIVER_OK in one write.
    g.w(
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_eq!(g.r(0x70) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    assert!(!g.dev.is_live());
}

#[test]
fn status_bits_clear_only_through_reset_and_reset_forgets_the_queue() {
    let mut g = Guest::new(false);
    let live = g.r(0x70);
    g.w(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(g.r(0x70), live, "clearing bits without a reset is ignored");
    // Queue registers are frozen while the queue is ready.
    g.w(0x80, 0x5000);
    assert_eq!(g.r(0x80), u32::try_from(DESC).unwrap());
    g.w(0x70, 0);
    assert_eq!(g.r(0x70), 0);
    assert_eq!(g.r(0x44), 0);
    assert_eq!(g.r(0x80), 0);
    assert!(!g.dev.is_live());
    // A notify on a reset device does nothing.
    g.w(0x50, 0);
    assert_eq!(g.irqs.0.load(Ordering::SeqCst), 0);
}

#[test]
fn a_machine_reset_leaves_a_fresh_device_on_the_same_image() {
    let mut g = Guest::new(false);
    g.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 3, 512, 0).1, s(VIRTIO_BLK_S_OK));
    g.dev.hard_reset();
    assert_eq!((g.r(0x70), g.r(0x44), g.r(0x60)), (0, 0, 0));
    // The next boot's driver sets it up again; the image still holds what was written and is
    // still locked.
    g.mem
        .write_slice(&[0u8; 0x2000], GuestAddress(AVAIL))
        .unwrap();
    g.avail_idx = 0;
    let s0 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    g.w(0x70, s0);
    g.w(0x24, 1);
    g.w(0x20, 1);
    g.w(0x70, s0 | VIRTIO_CONFIG_S_FEATURES_OK);
    g.setup_queue();
    g.w(
        0x70,
        s0 | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, 3, 512, F_WRITE),
        (513, s(VIRTIO_BLK_S_OK))
    );
    let mut back = [0u8; 512];
    g.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, [0x5a; 512]);
    assert!(matches!(
        Block::open(g.image.path(), false),
        Err(BlockError::Locked(..))
    ));
}

#[test]
fn rings_outside_guest_ram_cannot_be_readied() {
    let mut g = Guest::raw(false);
    g.w(0x30, 0);
    g.w(0x38, u32::from(QUEUE_SIZE));
    g.w(0x80, 0);
    g.w(0x84, 1); // 4 GiB: no RAM there
    g.w(0x90, u32::try_from(AVAIL).unwrap());
    g.w(0xa0, u32::try_from(USED).unwrap());
    g.w(0x44, 1);
    assert_eq!(g.r(0x44), 0);
    // Nor can a size that is not a power of two.
    g.w(0x84, 0);
    g.w(0x38, 100);
    g.w(0x44, 1);
    assert_eq!(g.r(0x44), 0);
    // A valid size makes the same rings acceptable.
    g.w(0x38, 128);
    g.w(0x44, 1);
    assert_eq!(g.r(0x44), 1);
}

#[test]
fn writes_reach_the_image_and_reads_come_back() {
    let mut g = Guest::new(false);
    let pattern: Vec<u8> = (0..1024u32).map(|i| u8::try_from(i % 7).unwrap()).collect();
    g.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    let (len, status) = g.request(VIRTIO_BLK_T_OUT, 2, 1024, 0);
    assert_eq!((len, status), (1, s(VIRTIO_BLK_S_OK)));
    assert_eq!(g.image_bytes(1024, 1024), pattern);
    assert_eq!(g.irqs.0.load(Ordering::SeqCst), 1);
    assert_eq!(g.r(0x60), 1, "used-buffer interrupt pending");
    g.w(0x64, 1);
    assert_eq!(g.r(0x60), 0);

    g.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    let (len, status) = g.request(VIRTIO_BLK_T_IN, 2, 1024, F_WRITE);
    assert_eq!((len, status), (1025, s(VIRTIO_BLK_S_OK)));
    let mut back = vec![0u8; 1024];
    g.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);

    // Untouched sectors still hold the original image.
    let (_, status) = g.request(VIRTIO_BLK_T_IN, 0, 512, F_WRITE);
    assert_eq!(status, s(VIRTIO_BLK_S_OK));
    g.mem
        .read_slice(&mut back[..512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(back[..512], g.image_bytes(0, 512)[..]);
}

#[test]
fn a_read_may_be_scattered_over_many_buffers() {
    let mut g = Guest::new(false);
    g.header(VIRTIO_BLK_T_IN, 4);
    // The header itself split in two, and the data in three buffers of odd sizes.
    g.chain(
        0,
        &[
            (HDR, 10, 0),
            (HDR + 10, 6, 0),
            (DATA, 100, F_WRITE),
            (DATA + 0x1000, 900, F_WRITE),
            (DATA + 0x2000, 24, F_WRITE),
            (STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(g.submit(0), (0, 1025));
    assert_eq!(g.status_byte(), s(VIRTIO_BLK_S_OK));
    let want = g.image_bytes(4 * 512, 1024);
    let mut got = vec![0u8; 1024];
    g.mem
        .read_slice(&mut got[..100], GuestAddress(DATA))
        .unwrap();
    g.mem
        .read_slice(&mut got[100..1000], GuestAddress(DATA + 0x1000))
        .unwrap();
    g.mem
        .read_slice(&mut got[1000..], GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(got, want);
}

#[test]
fn flush_get_id_and_unknown_requests() {
    let mut g = Guest::new(false);
    g.header(VIRTIO_BLK_T_FLUSH, 0);
    g.chain(0, &[(HDR, 16, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(g.submit(0), (0, 1));
    assert_eq!(g.status_byte(), s(VIRTIO_BLK_S_OK));

    let (len, status) = g.request(VIRTIO_BLK_T_GET_ID, 0, 20, F_WRITE);
    assert_eq!((len, status), (21, s(VIRTIO_BLK_S_OK)));
    let mut id = [0u8; 20];
    g.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert!(id.starts_with(b"bdvmm"));

    let (len, status) = g.request(VIRTIO_BLK_T_DISCARD, 0, 16, 0);
    assert_eq!((len, status), (1, s(VIRTIO_BLK_S_UNSUPP)));
}

#[test]
fn read_only_disk_refuses_writes_and_still_reads() {
    let mut g = Guest::new(true);
    let before = g.image_bytes(0, 512);
    g.mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    let (len, status) = g.request(VIRTIO_BLK_T_OUT, 0, 512, 0);
    assert_eq!((len, status), (1, s(VIRTIO_BLK_S_IOERR)));
    assert_eq!(g.image_bytes(0, 512), before);
    let (len, status) = g.request(VIRTIO_BLK_T_IN, 0, 512, F_WRITE);
    assert_eq!((len, status), (513, s(VIRTIO_BLK_S_OK)));
}

#[test]
fn requests_beyond_the_disk_or_not_in_sectors_are_ioerr() {
    let mut g = Guest::new(false);
    for (kind, sector, len, flags) in [
        (VIRTIO_BLK_T_IN, 64, 512, F_WRITE),
        (VIRTIO_BLK_T_IN, 63, 1024, F_WRITE),
        (VIRTIO_BLK_T_OUT, 64, 512, 0),
        (VIRTIO_BLK_T_IN, u64::MAX, 512, F_WRITE),
        (VIRTIO_BLK_T_IN, u64::MAX / 512 + 1, 512, F_WRITE),
        (VIRTIO_BLK_T_IN, 0, 100, F_WRITE),
        (VIRTIO_BLK_T_OUT, 0, 700, 0),
        // Data the wrong way round for the request.
        (VIRTIO_BLK_T_IN, 0, 512, 0),
        (VIRTIO_BLK_T_OUT, 0, 512, F_WRITE),
    ] {
        let before = g.image_bytes(0, 64 * 512);
        let (used, status) = g.request(kind, sector, len, flags);
        assert_eq!(
            status,
            s(VIRTIO_BLK_S_IOERR),
            "{kind} at {sector} len {len}"
        );
        assert_eq!(used, 1);
        assert_eq!(g.image_bytes(0, 64 * 512), before);
    }
}

#[test]
fn the_image_is_locked_against_a_second_writer() {
    let img = image(8);
    let rw = Block::open(img.path(), false).unwrap();
    assert!(matches!(
        Block::open(img.path(), false),
        Err(BlockError::Locked(..))
    ));
    assert!(matches!(
        Block::open(img.path(), true),
        Err(BlockError::Locked(..))
    ));
    drop(rw);
    let ro1 = Block::open(img.path(), true).unwrap();
    let _ro2 = Block::open(img.path(), true).unwrap();
    assert!(matches!(
        Block::open(img.path(), false),
        Err(BlockError::Locked(..))
    ));
    drop(ro1);
    drop(_ro2);
    Block::open(img.path(), false).unwrap();
}

#[test]
fn unusable_images_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Block::open(&dir.path().join("absent.img"), false),
        Err(BlockError::Open(..))
    ));
    assert!(matches!(
        Block::open(dir.path(), true),
        Err(BlockError::Unusable(..))
    ));
    // A character device is neither an image nor a disk.
    assert!(matches!(
        Block::open(std::path::Path::new("/dev/null"), true),
        Err(BlockError::Unusable(..))
    ));
    let tiny = dir.path().join("tiny.img");
    std::fs::write(&tiny, [0u8; 100]).unwrap();
    let e = Block::open(&tiny, false).err().unwrap();
    assert!(e.to_string().contains("sector"), "{e}");
}

// Hostile chains: each ends in IOERR or an empty used entry, the queue keeps working and the
// image is untouched.

fn assert_still_serves(g: &mut Guest) {
    let (len, status) = g.request(VIRTIO_BLK_T_IN, 1, 512, F_WRITE);
    assert_eq!((len, status), (513, s(VIRTIO_BLK_S_OK)));
    assert!(g.dev.is_live());
}

#[test]
fn buffers_outside_guest_ram_are_ioerr() {
    let mut g = Guest::new(false);
    let before = g.image_bytes(0, 64 * 512);
    for addr in [RAM, RAM - 256, u64::MAX - 100, 1 << 40] {
        g.header(VIRTIO_BLK_T_OUT, 0);
        g.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        g.chain(0, &[(HDR, 16, 0), (addr, 512, 0), (STATUS, 1, F_WRITE)]);
        assert_eq!(g.submit(0), (0, 1));
        assert_eq!(g.status_byte(), s(VIRTIO_BLK_S_IOERR));
    }
    // A header outside RAM, and a status byte outside RAM: nothing can be answered.
    g.chain(0, &[(RAM + 4096, 16, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(g.submit(0), (0, 1));
    g.header(VIRTIO_BLK_T_IN, 0);
    g.chain(0, &[(HDR, 16, 0), (DATA, 512, F_WRITE), (RAM, 1, F_WRITE)]);
    assert_eq!(g.submit(0), (0, 0));
    assert_eq!(g.image_bytes(0, 64 * 512), before);
    assert_still_serves(&mut g);
}

#[test]
fn looping_and_dangling_chains_are_returned_empty() {
    let mut g = Guest::new(false);
    g.header(VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 2 -> 1 ...
    g.desc(0, HDR, 16, F_NEXT, 1);
    g.desc(1, DATA, 512, F_WRITE | F_NEXT, 2);
    g.desc(2, STATUS, 1, F_WRITE | F_NEXT, 1);
    assert_eq!(g.submit(0), (0, 0));
    // A self-loop on the head.
    g.desc(0, HDR, 16, F_NEXT, 0);
    assert_eq!(g.submit(0), (0, 0));
    // `next` past the end of the table.
    g.desc(0, HDR, 16, F_NEXT, QUEUE_SIZE + 44);
    assert_eq!(g.submit(0), (0, 0));
    assert_still_serves(&mut g);
}

#[test]
fn empty_misordered_and_short_chains_are_refused() {
    let mut g = Guest::new(false);
    g.header(VIRTIO_BLK_T_IN, 0);
    // A zero-length data buffer.
    g.chain(0, &[(HDR, 16, 0), (DATA, 0, F_WRITE), (STATUS, 1, F_WRITE)]);
    assert_eq!(g.submit(0), (0, 1));
    assert_eq!(g.status_byte(), s(VIRTIO_BLK_S_IOERR));
    // A readable buffer after a writable one.
    g.chain(
        0,
        &[
            (HDR, 16, 0),
            (DATA, 512, F_WRITE),
            (DATA + 0x1000, 512, 0),
            (STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(g.submit(0), (0, 1));
    assert_eq!(g.status_byte(), s(VIRTIO_BLK_S_IOERR));
    // No status byte at all.
    g.chain(0, &[(HDR, 16, 0), (DATA, 512, 0)]);
    assert_eq!(g.submit(0), (0, 0));
    // A header shorter than 16 bytes.
    g.chain(0, &[(HDR, 8, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(g.submit(0), (0, 1));
    assert_eq!(g.status_byte(), s(VIRTIO_BLK_S_IOERR));
    // Only a status byte.
    g.chain(0, &[(STATUS, 1, F_WRITE)]);
    assert_eq!(g.submit(0), (0, 1));
    assert_eq!(g.status_byte(), s(VIRTIO_BLK_S_IOERR));
    assert_still_serves(&mut g);
}

#[test]
fn chains_longer_than_the_bound_are_refused_before_any_io() {
    let mut g = Guest::new(false);
    let before = g.image_bytes(0, 64 * 512);
    g.header(VIRTIO_BLK_T_OUT, 0);
    // Each buffer is the same MiB of RAM, so the chain is long without the guest being big.
    let chunk = 0x10_0000u32;
    let n = usize::try_from(MAX_REQUEST_BYTES / u64::from(chunk) + 2).unwrap();
    let mut descs = vec![(HDR, 16, 0)];
    descs.extend(std::iter::repeat_n((0x10_0000u64, chunk, 0u16), n));
    descs.push((STATUS, 1, F_WRITE));
    g.chain(0, &descs);
    assert_eq!(g.submit(0), (0, 1));
    assert_eq!(g.status_byte(), s(VIRTIO_BLK_S_IOERR));
    assert_eq!(g.image_bytes(0, 64 * 512), before);
    assert_still_serves(&mut g);
}

#[test]
fn indirect_tables_outside_ram_end_the_chain_cleanly() {
    let mut g = Guest::new(false);
    g.desc(0, RAM + 0x1000, 64, F_INDIRECT, 0);
    assert_eq!(g.submit(0), (0, 0));
    // An indirect table whose length is not a whole number of descriptors.
    g.desc(0, DATA, 17, F_INDIRECT, 0);
    assert_eq!(g.submit(0), (0, 0));
    assert_still_serves(&mut g);
}

#[test]
fn a_head_index_past_the_table_needs_a_reset() {
    let mut g = Guest::new(false);
    let slot = AVAIL + 4;
    g.mem.write_obj(QUEUE_SIZE + 1, GuestAddress(slot)).unwrap();
    g.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    g.w(0x50, 0);
    assert_ne!(g.r(0x70) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    let used: u16 = g.mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(
        used, 0,
        "no used entry names a descriptor that does not exist"
    );
}

#[test]
fn a_corrupt_available_index_needs_a_reset_and_a_reset_recovers() {
    let mut g = Guest::new(false);
    g.mem
        .write_obj(QUEUE_SIZE + 5, GuestAddress(AVAIL + 2))
        .unwrap();
    g.w(0x50, 0);
    assert_ne!(g.r(0x70) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(g.r(0x60) & 2, 2, "configuration interrupt");
    assert!(!g.dev.is_live());
    // Further notifies are ignored until the driver resets.
    g.w(0x50, 0);
    // The driver resets and starts over with clean rings.
    g.w(0x70, 0);
    g.mem
        .write_slice(&[0u8; 0x2000], GuestAddress(AVAIL))
        .unwrap();
    g.avail_idx = 0;
    let s0 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    g.w(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    g.w(0x70, s0);
    g.w(0x24, 1);
    g.w(0x20, 1);
    g.w(0x70, s0 | VIRTIO_CONFIG_S_FEATURES_OK);
    g.setup_queue();
    g.w(
        0x70,
        s0 | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_still_serves(&mut g);
}

#[test]
fn a_block_device_on_the_bus_answers_at_its_window() {
    use super::bus::{MmioBus, MMIO_BASE};
    use std::sync::Mutex;
    let g = Guest::raw(false);
    let mut bus = MmioBus::new();
    let slot = bus.add(Arc::new(Mutex::new(g.dev))).unwrap();
    assert_eq!(slot.base, MMIO_BASE);
    let mut b = [0u8; 4];
    assert!(bus.read(MMIO_BASE, &mut b));
    assert_eq!(u32::from_le_bytes(b), MMIO_MAGIC);
    assert!(bus.read(MMIO_BASE + 8, &mut b));
    assert_eq!(u32::from_le_bytes(b), 2);
}

#[test]
fn a_block_device_asks_the_engine_to_serve_its_notifier() {
    let g = Guest::new(false);
    let n = g.dev.notifiers().unwrap();
    assert_eq!(
        n.iter().map(|n| (n.queue, n.serve)).collect::<Vec<_>>(),
        vec![(0, true)]
    );
    // Not offloaded: InterruptStatus is only what the transport raised.
    assert_eq!(g.r(0x60), 0);
}
