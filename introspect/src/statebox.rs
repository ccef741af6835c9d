//! State Boxes read from a guest process's own memory, without the guest's help.
//!
//! An application keeps each session's essential state in State Boxes (the `statebox` crate and
//! its C library; ABI in `statebox/ABI.md`): one region at the fixed user address
//! [`STATEBOX_VA`], locked in memory. A monitor finds it through the process's page tables
//! (`task_struct.mm->pgd`), reads the header and the slots in a few batched reads
//! ([`read_through`]), and checks each slot's active copy against the ABI. Who owns a region is what the kernel's process table says (pid, uid, comm);
//! everything inside it is the application's claim: a bad header refuses the region, a bad slot
//! is refused alone and the rest is still read.
//!
//! Reads follow the guest's tables as they are: call with the guest paused (or dead) for a
//! consistent picture. The ABI's double-buffered copies mean a guest paused in the middle of an
//! export still shows the previous state whole.

use statebox::abi::{self, AbiError, BoxCopy, Header, STATEBOX_VA};

use crate::conv::usize_from;
use crate::mem::PhysMem;
use crate::paging::{PageWalker, PagingError};
use crate::target::Target;
use crate::tasks::{KernelMem, Process, TaskError};

/// Processes one [`read_all`] looks at, at most.
pub const MAX_PROCESSES: usize = 4096;

/// Why a region could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateBoxError {
    /// The kernel's BTF has no usable `mm_struct.pgd`.
    #[error(
        "this kernel's mm_struct.pgd is unknown (see the layout's unresolved fields): processes' \
         own memory, so State Boxes, cannot be read"
    )]
    NoPgd,
    /// Reading the process's kernel structures failed.
    #[error("process {pid}: {source}")]
    Task {
        /// The process.
        pid: u32,
        /// What failed.
        source: TaskError,
    },
    /// Following its page tables failed (other than "not mapped").
    #[error("process {pid}: its page tables: {source}")]
    Paging {
        /// The process.
        pid: u32,
        /// What failed.
        source: PagingError,
    },
    /// The region's header is not a State Box region of ours.
    #[error("process {pid} ({comm}): a region at {va:#x} that is not a valid State Box region: {source}", va = STATEBOX_VA)]
    Header {
        /// The process.
        pid: u32,
        /// Its command.
        comm: String,
        /// What is wrong with it.
        source: AbiError,
    },
    /// Part of the region is not mapped (the ABI says it is locked in memory).
    #[error("process {pid} ({comm}): its State Box region is not wholly mapped: {source}")]
    Hole {
        /// The process.
        pid: u32,
        /// Its command.
        comm: String,
        /// The first page missing.
        source: PagingError,
    },
}

/// One slot the monitor refused, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Slot index.
    pub slot: u32,
    /// What was wrong.
    pub reason: AbiError,
}

/// One process's State Box region as read.
#[derive(Clone, Debug)]
pub struct Region {
    /// The owner's process id (from the kernel's process table).
    pub pid: u32,
    /// Its real uid (from the kernel).
    pub uid: u32,
    /// Its command (from the kernel).
    pub comm: String,
    /// The region's header (the application's claim, validated).
    pub header: Header,
    /// Every box in use, in slot order.
    pub boxes: Vec<BoxCopy>,
    /// Slots refused.
    pub refused: Vec<Refused>,
    /// Bytes read at the region's address: its pages, and any read with the header past a
    /// region smaller than [`FIRST_READ`].
    pub bytes_read: u64,
}

impl Region {
    /// Total data bytes of its boxes.
    pub fn data_bytes(&self) -> usize {
        self.boxes.iter().map(|b| b.data.len()).sum()
    }
}

/// Reads the State Box region of process `p`, if it has one: `Ok(None)` when the process has no
/// memory of its own (a kernel thread, a zombie) or nothing is mapped at [`STATEBOX_VA`].
pub fn read_region(
    target: &Target,
    mem: &dyn PhysMem,
    p: &Process,
) -> Result<Option<Region>, StateBoxError> {
    let pgd_off = target.layout.mm_pgd.ok_or(StateBoxError::NoPgd)?;
    let pid = p.task.tgid;
    let task_err = |source| StateBoxError::Task { pid, source };
    if p.task.kthread {
        return Ok(None);
    }
    let km = KernelMem::new(mem, target.loc.clone());
    let mm = km
        .read_u64(p.task.addr.wrapping_add(target.layout.mm), "task mm")
        .map_err(task_err)?;
    if mm == 0 {
        return Ok(None);
    }
    let pgd = km
        .read_u64(mm.wrapping_add(pgd_off), "mm pgd")
        .map_err(task_err)?;
    let root = km.phys(pgd, "mm pgd").map_err(task_err)?;
    let pw = PageWalker::new(mem, root, target.loc.levels)
        .map_err(|source| StateBoxError::Paging { pid, source })?;
    read_through(&pw, pid, p.task.uid, &p.task.comm)
}

/// Region bytes read together with the header, before the header says how large the region is:
/// 16 pages, enough for a region of a few boxes of a few KiB, in the one batch that brings the
/// header. Only pages mapped right after the region's start are read, and a region that is
/// larger costs one more batch for the rest.
pub const FIRST_READ: u64 = 64 << 10;

/// The span one page table maps: the first walk translates up to its end.
const SPAN: u64 = 2 << 20;

/// Reads a region through `pw` (the process's page tables); `pid`, `uid` and `comm` are what the
/// kernel says of its owner. `Ok(None)` when nothing is mapped at [`STATEBOX_VA`].
///
/// A handful of round trips whatever the region's size: the page-table levels above the region
/// (one read each), its run of page-table entries (one read), then the header page with the
/// pages after it, up to [`FIRST_READ`], in one [`PhysMem::read_many`]; only a region larger than
/// that needs one more for the rest (and a region past the first page table its entries). The
/// bytes are then parsed in memory: every slot whole, both copies, which costs fewer round trips
/// than reading each slot's seq first to pick its active copy.
pub fn read_through(
    pw: &PageWalker<'_>,
    pid: u32,
    uid: u32,
    comm: &str,
) -> Result<Option<Region>, StateBoxError> {
    let paging = |source| StateBoxError::Paging { pid, source };
    let hole = |source| match source {
        PagingError::NotPresent { .. } => StateBoxError::Hole {
            pid,
            comm: comm.to_string(),
            source,
        },
        source => StateBoxError::Paging { pid, source },
    };
    // The region's start, up to the end of its first page table (a region is at most 8 MiB).
    let first_span = (SPAN - STATEBOX_VA % SPAN).min(abi::MAX_REGION_BYTES);
    let head = pw.map_prefix(STATEBOX_VA, first_span).map_err(paging)?;
    if head.is_empty() {
        return Ok(None);
    }
    let mut bytes = vec![0u8; usize_from(head.len().min(FIRST_READ))];
    if pw
        .read_extents(&head.extents, STATEBOX_VA, &mut bytes)
        .is_err()
    {
        // A page after the header that the source refuses (outside RAM, not granted): a mapped
        // page need not belong to the region. The header alone.
        bytes = vec![0u8; abi::HEADER_USED];
        pw.read_extents(&head.extents, STATEBOX_VA, &mut bytes)
            .map_err(paging)?;
    }
    let header = Header::parse(&bytes).map_err(|source| StateBoxError::Header {
        pid,
        comm: comm.to_string(),
        source,
    })?;
    // The header bounds the region to MAX_REGION_BYTES.
    let size = header.region_bytes();
    let have = bytes.len() as u64;
    if size > have {
        let mut extents = head.extents;
        let mapped: u64 = extents.iter().map(|e| e.len).sum();
        if size > mapped {
            if let Some(stop) = head.stop {
                return Err(hole(stop));
            }
            let more = pw
                .map_prefix(STATEBOX_VA + mapped, size - mapped)
                .map_err(paging)?;
            if let Some(stop) = more.stop {
                return Err(hole(stop));
            }
            extents.extend(more.extents);
        }
        bytes.resize(usize_from(size), 0);
        let rest = bytes.get_mut(usize_from(have)..).unwrap_or_default();
        pw.read_extents(&extents, STATEBOX_VA + have, rest)
            .map_err(hole)?;
    }
    let mut boxes = Vec::new();
    let mut refused = Vec::new();
    for slot in 0..header.slot_count {
        let Some(slot_bytes) = header.slot_bytes(&bytes, slot) else {
            break;
        };
        match abi::parse_slot(&header, slot, slot_bytes) {
            Ok(Some(b)) => boxes.push(b),
            Ok(None) => {}
            Err(reason) => refused.push(Refused { slot, reason }),
        }
    }
    Ok(Some(Region {
        pid,
        uid,
        comm: comm.to_string(),
        header,
        boxes,
        refused,
        bytes_read: bytes.len() as u64,
    }))
}

/// Every region of the processes `select` picks (at most [`MAX_PROCESSES`] looked at), and the
/// processes whose region could not be read, with why.
pub fn read_all(
    target: &Target,
    mem: &dyn PhysMem,
    processes: &[Process],
    select: impl Fn(&Process) -> bool,
) -> (Vec<Region>, Vec<StateBoxError>) {
    let mut found = Vec::new();
    let mut failed = Vec::new();
    for p in processes
        .iter()
        .filter(|p| !p.task.kthread && select(p))
        .take(MAX_PROCESSES)
    {
        match read_region(target, mem, p) {
            Ok(Some(r)) => found.push(r),
            Ok(None) => {}
            Err(e) => failed.push(e),
        }
    }
    (found, failed)
}

#[cfg(test)]
mod extraction_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::VecMem;

    const RAM: usize = 4 << 20;
    /// Page-table pages: PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000; data from 0x10_0000.
    fn map(mem: &VecMem, pages: &[u64]) {
        let w = |gpa: u64, v: u64| mem.write(gpa, &v.to_le_bytes()).unwrap();
        let va = STATEBOX_VA;
        let i4 = (va >> 39) & 0x1ff;
        let i3 = (va >> 30) & 0x1ff;
        let i2 = (va >> 21) & 0x1ff;
        let i1 = (va >> 12) & 0x1ff;
        w(0x1000 + i4 * 8, 0x2000 | 0x7);
        w(0x2000 + i3 * 8, 0x3000 | 0x7);
        w(0x3000 + i2 * 8, 0x4000 | 0x7);
        for (k, phys) in pages.iter().enumerate() {
            w(0x4000 + (i1 + k as u64) * 8, phys | 0x7);
        }
    }

    fn region_image(slots: u32, capacity: u32, boxes: &[(u32, u64, u64, &[u8])]) -> Vec<u8> {
        let mut h = Header::new(slots, capacity).unwrap();
        h.region_generation = 42;
        let mut img = vec![0u8; usize::try_from(h.region_bytes()).unwrap()];
        img[..64].copy_from_slice(&h.encode());
        for (slot, id, generation, data) in boxes {
            let off = usize::try_from(h.slot_offset(*slot).unwrap()).unwrap();
            let size = usize::try_from(h.slot_size).unwrap();
            // seq 0: copy 0 (at SLOT_HEADER) is the active one.
            let slot = &mut img[off..off + size];
            abi::write_copy(&mut slot[64..], h.capacity, *id, *generation, data).unwrap();
        }
        img
    }

    fn place(mem: &VecMem, img: &[u8]) {
        // Scatter the region's pages in reverse physical order: the walk must follow the tables.
        let n = img.len() / 4096;
        let pages: Vec<u64> = (0..n as u64).map(|k| 0x20_0000 - k * 0x1000).collect();
        map(mem, &pages);
        for (k, phys) in pages.iter().enumerate() {
            mem.write(*phys, &img[k * 4096..(k + 1) * 4096]).unwrap();
        }
    }

    #[test]
    fn reads_every_box_through_the_page_tables() {
        let mem = VecMem::new(0, vec![0; RAM]);
        let img = region_image(8, 4000, &[(0, 7, 1, b"alpha"), (5, 9, 2, &[0xab; 3000])]);
        place(&mem, &img);
        let pw = PageWalker::new(&mem, 0x1000, 4).unwrap();
        let r = read_through(&pw, 100, 1000, "front").unwrap().unwrap();
        assert_eq!(r.boxes.len(), 2);
        assert_eq!(r.boxes[0].id, 7);
        assert_eq!(r.boxes[0].data, b"alpha");
        assert_eq!(r.boxes[1].slot, 5);
        assert_eq!(r.boxes[1].data.len(), 3000);
        assert!(r.refused.is_empty());
        assert_eq!(r.header.region_generation, 42);
    }

    #[test]
    fn nothing_mapped_is_no_region() {
        let mem = VecMem::new(0, vec![0; RAM]);
        let pw = PageWalker::new(&mem, 0x1000, 4).unwrap();
        assert!(read_through(&pw, 1, 0, "x").unwrap().is_none());
    }

    #[test]
    fn a_corrupt_slot_is_refused_alone() {
        let mem = VecMem::new(0, vec![0; RAM]);
        let mut img = region_image(4, 256, &[(0, 7, 1, b"good"), (1, 8, 2, b"bad!")]);
        let h = Header::parse(&img).unwrap();
        let off = usize::try_from(h.slot_offset(1).unwrap()).unwrap();
        // Flip a data byte of slot 1's active copy (copy 0 at +64, data at +32 in the copy).
        img[off + 64 + 32] ^= 0xff;
        place(&mem, &img);
        let pw = PageWalker::new(&mem, 0x1000, 4).unwrap();
        let r = read_through(&pw, 1, 0, "x").unwrap().unwrap();
        assert_eq!(r.boxes.len(), 1);
        assert_eq!(r.refused.len(), 1);
        assert_eq!(r.refused[0].slot, 1);
    }

    #[test]
    fn a_bad_header_or_a_hole_refuses_the_region() {
        let mem = VecMem::new(0, vec![0; RAM]);
        let mut img = region_image(4, 256, &[]);
        img[0] ^= 1;
        place(&mem, &img);
        let pw = PageWalker::new(&mem, 0x1000, 4).unwrap();
        assert!(matches!(
            read_through(&pw, 1, 0, "x"),
            Err(StateBoxError::Header { .. })
        ));
        // A header that claims more slots than are mapped.
        let mem = VecMem::new(0, vec![0; RAM]);
        let img = region_image(64, 4096, &[]);
        let mut short = img[..8192].to_vec();
        short.resize(8192, 0);
        map(&mem, &[0x10_0000, 0x10_1000]);
        mem.write(0x10_0000, &short[..4096]).unwrap();
        let pw = PageWalker::new(&mem, 0x1000, 4).unwrap();
        assert!(matches!(
            read_through(&pw, 1, 0, "x"),
            Err(StateBoxError::Hole { .. })
        ));
    }

    #[test]
    fn random_regions_never_panic() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mem = VecMem::new(0, vec![0; RAM]);
            let mut img = region_image(16, 512, &[(0, 1, 1, b"x"), (3, 2, 2, b"yy")]);
            for _ in 0..8 {
                let at = usize::try_from(next() % img.len() as u64).unwrap();
                img[at] = u8::try_from(next() & 0xff).unwrap();
            }
            place(&mem, &img);
            let pw = PageWalker::new(&mem, 0x1000, 4).unwrap();
            let _ = read_through(&pw, 1, 0, "x");
        }
    }
}
