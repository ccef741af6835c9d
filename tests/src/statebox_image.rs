//! A memory image (guest-physical address = file offset) holding the State Box regions of made-up
//! processes, each behind its own 4-level page tables that map the region at
//! [`STATEBOX_VA`]: what `rdma-bridge serve --dump` serves when a benchmark extracts State Boxes
//! through the bridge without booting a guest (`tests/benches/statebox.rs`).
//!
//! Page-table pages and region pages are placed at pseudo-random, distinct physical frames (a
//! fixed seed, so every run has the same layout): a walk must follow the tables, and reads of
//! consecutive virtual pages do not fall into one physical block.

use std::collections::HashSet;
use std::path::Path;

use statebox::abi::{self, AbiError, Header, STATEBOX_VA};

const PAGE: u64 = 4096;
/// Present, writable, user: what Linux puts in a user mapping's table entries.
const PTE_FLAGS: u64 = 0x7;
/// Frames below 1 MiB are left alone (a real guest's low memory; the bridge's backdoor range).
const FIRST_FRAME: u64 = 0x100;

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The region's geometry or a box is outside the State Box ABI.
    #[error("State Box region: {0}")]
    Abi(#[from] AbiError),
    /// More boxes than slots.
    #[error("{boxes} boxes do not fit {slots} slots: give the region more slots")]
    TooManyBoxes {
        /// Boxes asked for.
        boxes: usize,
        /// Slots of the region.
        slots: u32,
    },
    /// The image has no free frame left.
    #[error("the {mib} MiB image has no free page left: make it larger")]
    Full {
        /// The image's size.
        mib: usize,
    },
    /// Writing the file failed.
    #[error("writing the memory image {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
}

/// One box of a region: its id (the session id) and its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageBox {
    /// The box's id (nonzero).
    pub id: u64,
    /// Its data (at most the region's capacity).
    pub data: Vec<u8>,
}

/// A process placed in the image: its page-table root and what its region holds.
#[derive(Clone, Debug)]
pub struct ImageProcess {
    /// Guest-physical address of its PML4 (what CR3 / `mm->pgd` would give).
    pub cr3: u64,
    /// Its region's header.
    pub header: Header,
    /// Its boxes, box `i` in slot `i`.
    pub boxes: Vec<ImageBox>,
}

/// A memory image being built.
pub struct StateBoxImage {
    ram: Vec<u8>,
    mib: usize,
    used: HashSet<u64>,
    rng: u64,
}

impl StateBoxImage {
    /// An all-zero image of `mib` MiB; `seed` fixes where pages land.
    pub fn new(mib: usize, seed: u64) -> StateBoxImage {
        StateBoxImage {
            ram: vec![0u8; mib << 20],
            mib,
            used: HashSet::new(),
            rng: seed | 1,
        }
    }

    /// The image's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.ram
    }

    /// Writes the image to `path`.
    pub fn write(&self, path: &Path) -> Result<(), ImageError> {
        std::fs::write(path, &self.ram).map_err(|source| ImageError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    /// Adds a process whose region has `slot_count` slots of `capacity` bytes and holds `boxes`
    /// (box `i` in slot `i`; odd slots have published once more, so their copy 1 is active),
    /// mapped at [`STATEBOX_VA`] by page tables of its own.
    pub fn add_process(
        &mut self,
        slot_count: u32,
        capacity: u32,
        boxes: Vec<ImageBox>,
    ) -> Result<ImageProcess, ImageError> {
        let mut header = Header::new(slot_count, capacity)?;
        if boxes.len() > usize::try_from(slot_count).unwrap_or(usize::MAX) {
            return Err(ImageError::TooManyBoxes {
                boxes: boxes.len(),
                slots: slot_count,
            });
        }
        header.region_generation = self.next_random() | 1;
        header.next_generation = u64::try_from(boxes.len()).unwrap_or(u64::MAX) + 1;
        let region = region_bytes(&header, &boxes)?;

        let cr3 = self.frame()?;
        // The tables made so far below the root: (level of the entry, VA it spans from, frame).
        let mut tables: Vec<(u32, u64, u64)> = Vec::new();
        for (k, page) in region.chunks(4096).enumerate() {
            let va = STATEBOX_VA + u64::try_from(k).unwrap_or(u64::MAX) * PAGE;
            let frame = self.frame()?;
            self.put(frame, page);
            let mut table = cr3;
            for level in (2..=4u32).rev() {
                let shift = 12 + 9 * (level - 1);
                let span = va >> shift << shift;
                let next = match tables.iter().find(|&&(l, s, _)| l == level && s == span) {
                    Some(&(_, _, f)) => f,
                    None => {
                        let f = self.frame()?;
                        tables.push((level, span, f));
                        self.set_entry(table, (va >> shift) & 0x1ff, f);
                        f
                    }
                };
                table = next;
            }
            self.set_entry(table, (va >> 12) & 0x1ff, frame);
        }
        Ok(ImageProcess { cr3, header, boxes })
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: reproducible, and good enough to scatter pages.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// A free frame's guest-physical address, picked at random above [`FIRST_FRAME`].
    fn frame(&mut self) -> Result<u64, ImageError> {
        let frames = u64::try_from(self.ram.len()).unwrap_or(0) / PAGE;
        let free = frames.saturating_sub(FIRST_FRAME);
        if u64::try_from(self.used.len()).unwrap_or(u64::MAX) >= free {
            return Err(ImageError::Full { mib: self.mib });
        }
        loop {
            let f = FIRST_FRAME + self.next_random() % free;
            if self.used.insert(f) {
                return Ok(f * PAGE);
            }
        }
    }

    fn put(&mut self, gpa: u64, bytes: &[u8]) {
        let at = usize::try_from(gpa).unwrap_or(usize::MAX);
        self.ram[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn set_entry(&mut self, table: u64, index: u64, target: u64) {
        self.put(table + index * 8, &(target | PTE_FLAGS).to_le_bytes());
    }
}

/// The region's bytes as the State Box library would have left them.
fn region_bytes(header: &Header, boxes: &[ImageBox]) -> Result<Vec<u8>, ImageError> {
    let len = usize::try_from(header.region_bytes()).unwrap_or(usize::MAX);
    let mut region = vec![0u8; len];
    region[..abi::HEADER_USED].copy_from_slice(&header.encode());
    for (slot, b) in (0u32..).zip(boxes) {
        let off = header
            .slot_offset(slot)
            .and_then(|o| usize::try_from(o).ok())
            .unwrap_or(len);
        let seq = 2 * u64::from(slot % 2);
        let copy = off + usize::try_from(header.copy_offset(abi::active_copy(seq))).unwrap_or(len);
        region[off..off + 8].copy_from_slice(&seq.to_le_bytes());
        let generation = u64::from(slot) + 1;
        let end = (copy + usize::try_from(header.copy_size()).unwrap_or(0)).min(len);
        abi::write_copy(
            &mut region[copy.min(end)..end],
            header.capacity,
            b.id,
            generation,
            &b.data,
        )?;
    }
    Ok(region)
}

#[cfg(test)]
mod tests {
    use super::*;
    use introspect::mem::VecMem;
    use introspect::paging::PageWalker;
    use introspect::statebox::read_through;

    fn boxes(n: u64, size: usize) -> Vec<ImageBox> {
        (1..=n)
            .map(|id| ImageBox {
                id,
                data: (0..size)
                    .map(|i| i.to_le_bytes()[0] ^ id.to_le_bytes()[0])
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn every_process_reads_back_its_own_boxes_through_its_tables() {
        let mut img = StateBoxImage::new(16, 7);
        let one = img.add_process(1, 10 * 1024, boxes(1, 10 * 1024)).unwrap();
        let many = img.add_process(40, 256, boxes(40, 256)).unwrap();
        let mem = VecMem::new(0, img.bytes().to_vec());
        for p in [&one, &many] {
            let pw = PageWalker::new(&mem, p.cr3, 4).unwrap();
            let r = read_through(&pw, 1, 1000, "front").unwrap().unwrap();
            assert!(r.refused.is_empty(), "{:?}", r.refused);
            assert_eq!(r.header, p.header);
            let got: Vec<(u64, &[u8])> = r.boxes.iter().map(|b| (b.id, &b.data[..])).collect();
            let want: Vec<(u64, &[u8])> = p.boxes.iter().map(|b| (b.id, &b.data[..])).collect();
            assert_eq!(got, want);
        }
        assert_eq!(many.boxes.len(), 40);
        // Odd slots publish through copy 1.
        let pw = PageWalker::new(&mem, many.cr3, 4).unwrap();
        let r = read_through(&pw, 1, 1000, "front").unwrap().unwrap();
        assert_eq!(r.boxes[1].seq, 2);
    }

    #[test]
    fn region_pages_are_scattered() {
        let mut img = StateBoxImage::new(16, 7);
        let p = img.add_process(40, 256, boxes(40, 256)).unwrap();
        let mem = VecMem::new(0, img.bytes().to_vec());
        let pw = PageWalker::new(&mem, p.cr3, 4).unwrap();
        let phys: Vec<u64> = (0..8)
            .map(|k| pw.walk(STATEBOX_VA + k * PAGE).unwrap().phys)
            .collect();
        let adjacent = phys.windows(2).filter(|w| w[1] == w[0] + PAGE).count();
        assert!(adjacent < 2, "{phys:x?}");
        assert!(phys.iter().all(|&f| f >= FIRST_FRAME * PAGE));
    }

    #[test]
    fn too_many_boxes_or_a_full_image_is_refused() {
        let mut img = StateBoxImage::new(2, 1);
        assert!(matches!(
            img.add_process(2, 256, boxes(3, 8)),
            Err(ImageError::TooManyBoxes { .. })
        ));
        // 2 MiB = 512 frames, 256 usable: a region of 4 MiB cannot fit.
        assert!(matches!(
            img.add_process(200, 10 * 1024, vec![]),
            Err(ImageError::Full { .. })
        ));
    }
}
