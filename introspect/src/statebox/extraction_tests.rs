//! The extractor's walk: round trips, regions over two page tables, large pages, 5 levels, and
//! pages the source refuses.

use statebox::abi::{self, Header, STATEBOX_VA};

use super::{read_through, StateBoxError};
use crate::mem::{MemError, PhysMem, VecMem};
use crate::paging::test_tables::{Tables, ROOT};
use crate::paging::PageWalker;

const PAGE: u64 = 4096;

/// A region image of `slots` slots of `capacity`, holding `boxes` (slot, id, data).
fn image(slots: u32, capacity: u32, boxes: &[(u32, u64, &[u8])]) -> Vec<u8> {
    let mut h = Header::new(slots, capacity).unwrap();
    h.region_generation = 7;
    let mut img = vec![0u8; usize::try_from(h.region_bytes()).unwrap()];
    img[..64].copy_from_slice(&h.encode());
    for &(slot, id, data) in boxes {
        let off = usize::try_from(h.slot_offset(slot).unwrap()).unwrap();
        let size = usize::try_from(h.slot_size).unwrap();
        abi::write_copy(&mut img[off + 64..off + size], h.capacity, id, 1, data).unwrap();
    }
    img
}

/// Maps the image's pages with 4 KiB pages at `frame(k)` and writes them there.
fn place(t: &Tables, img: &[u8], frame: impl Fn(u64) -> u64) {
    for (k, page) in (0u64..).zip(img.chunks(4096)) {
        t.map(STATEBOX_VA + k * PAGE, frame(k), PAGE);
        t.m.mem.write(frame(k), page).unwrap();
    }
}

fn check(r: &super::Region, want: &[(u32, u64, &[u8])]) {
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert_eq!(r.boxes.len(), want.len());
    for (b, &(slot, id, data)) in r.boxes.iter().zip(want) {
        assert_eq!((b.slot, b.id, b.data.as_slice()), (slot, id, data));
    }
}

#[test]
fn a_small_region_is_the_walk_and_one_batch() {
    for levels in [4u8, 5] {
        let t = Tables::new(levels, 4 << 20);
        let boxes: &[(u32, u64, &[u8])] = &[(0, 7, b"alpha"), (3, 9, &[0xab; 3000])];
        let img = image(4, 3000, boxes);
        assert!(img.len() as u64 <= super::FIRST_READ);
        // Scattered, in reverse physical order.
        place(&t, &img, |k| 0x30_0000 - k * PAGE);
        t.m.calls.set(0);
        let r = read_through(&t.walker(), 1, 2, "x").unwrap().unwrap();
        check(&r, boxes);
        // The levels above the page table, its entries, then every page in one batch.
        assert_eq!(t.m.calls.get(), u32::from(levels - 1) + 1 + 1);
        assert_eq!(r.bytes_read, img.len() as u64);
    }
}

#[test]
fn a_region_over_two_page_tables() {
    let t = Tables::new(4, 16 << 20);
    // 3 slots of 512 KiB boxes (1 MiB + 192 B each, two copies): 3 MiB and change, over two
    // 2 MiB spans.
    let big = vec![0x5a; 512 << 10];
    let boxes: &[(u32, u64, &[u8])] = &[(0, 1, b"first"), (2, 3, &big)];
    let img = image(3, 512 << 10, boxes);
    assert!(img.len() as u64 > 2 << 20 && (img.len() as u64) < 4 << 20);
    let n = img.len() as u64 / PAGE;
    place(&t, &img, |k| 0x10_0000 + ((k * 389) % n) * PAGE);
    t.m.calls.set(0);
    let r = read_through(&t.walker(), 1, 2, "x").unwrap().unwrap();
    check(&r, boxes);
    // Upper levels and the first page table; the header batch; the second span's directory
    // entry and page table; the rest in one read_many.
    assert_eq!(t.m.calls.get(), 3 + 1 + 1 + 1 + 1 + 1);

    // A page missing in the second span: a hole, not a partial region.
    let t = Tables::new(4, 16 << 20);
    place(&t, &img, |k| 0x10_0000 + ((k * 389) % n) * PAGE);
    let missing = STATEBOX_VA + (2 << 20) + 5 * PAGE;
    t.m.mem
        .write(pte_address(&t, missing), &0u64.to_le_bytes())
        .unwrap();
    assert!(matches!(
        read_through(&t.walker(), 1, 2, "x"),
        Err(StateBoxError::Hole { source: crate::paging::PagingError::NotPresent { va, .. }, .. })
            if va == missing
    ));
}

/// The physical address of the level-1 entry that maps `va` (4-level tables).
fn pte_address(t: &Tables, va: u64) -> u64 {
    let mut table = ROOT;
    for level in (2..=4u32).rev() {
        let at = table + ((va >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
        table = t.m.mem.read_u64(at).unwrap() & 0x000f_ffff_ffff_f000;
    }
    table + ((va >> 12) & 0x1ff) * 8
}

#[test]
fn a_region_in_a_2mib_page() {
    for levels in [4u8, 5] {
        let t = Tables::new(levels, 8 << 20);
        let boxes: &[(u32, u64, &[u8])] = &[(1, 11, b"in a large page")];
        let img = image(4, 256, boxes);
        t.map(STATEBOX_VA, 0x40_0000, 2 << 20);
        t.m.mem.write(0x40_0000, &img).unwrap();
        t.m.calls.set(0);
        let r = read_through(&t.walker(), 1, 2, "x").unwrap().unwrap();
        check(&r, boxes);
        // No page table: the levels down to the directory, then one read of the region.
        assert_eq!(t.m.calls.get(), u32::from(levels - 2) + 1 + 1);
    }
}

/// Tables in low memory and data in a 1 GiB page at 1 GiB, without 1 GiB of bytes.
struct Split {
    low: Tables,
    high: VecMem,
}

impl PhysMem for Split {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        if gpa >= self.high.base {
            self.high.read(gpa, buf)
        } else {
            self.low.m.read(gpa, buf)
        }
    }
}

#[test]
fn a_region_in_a_1gib_page() {
    let low = Tables::new(4, 1 << 20);
    low.map(STATEBOX_VA, 1 << 30, 1 << 30);
    let boxes: &[(u32, u64, &[u8])] = &[(0, 5, b"one gig")];
    let img = image(2, 64, boxes);
    let mut high = vec![0u8; 1 << 20];
    high[..img.len()].copy_from_slice(&img);
    let m = Split {
        low,
        high: VecMem::new(1 << 30, high),
    };
    let pw = PageWalker::new(&m, ROOT, 4).unwrap();
    let r = read_through(&pw, 1, 2, "x").unwrap().unwrap();
    check(&r, boxes);
}

#[test]
fn a_page_after_the_region_that_cannot_be_read_does_not_matter() {
    let t = Tables::new(4, 4 << 20);
    let boxes: &[(u32, u64, &[u8])] = &[(0, 3, b"short region")];
    let img = image(1, 64, boxes);
    assert_eq!(img.len() as u64, 2 * PAGE);
    place(&t, &img, |k| 0x20_0000 + k * 3 * PAGE);
    // Something else mapped right after, at a frame outside memory.
    t.map(STATEBOX_VA + 2 * PAGE, 0x7fff_0000_0000, PAGE);
    let r = read_through(&t.walker(), 1, 2, "x").unwrap().unwrap();
    check(&r, boxes);
}
