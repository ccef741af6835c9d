//! The writer side of State Boxes for Rust applications: one [`Region`] per process at
//! [`STATEBOX_VA`](crate::abi::STATEBOX_VA), boxes created, exported, imported and deleted
//! exactly as `ABI.md` says (write the inactive copy whole, then release-store `seq + 2`).
//!
//! Thread rules: writers take `&mut self`, so the borrow checker serializes them; share a
//! `Region` between threads behind a `Mutex`. After `fork`, the child has no mapping
//! (MADV_DONTFORK): it must not use the parent's `Region` (leak it with `std::mem::forget`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::abi::{self, AbiError, Header, HDR_NEXT_GENERATION};
use crate::mapping::{MapError, Mapping};

/// Errors of the State Box writer.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The geometry or data size is outside the ABI's bounds.
    #[error(transparent)]
    Abi(#[from] AbiError),
    /// A Region already exists in this process.
    #[error("a State Box region already exists in this process (there is one per process, at a fixed address): reuse it")]
    AlreadyOpen,
    /// Mapping the region failed.
    #[error(transparent)]
    Map(#[from] MapError),
    /// No random region generation could be had.
    #[error(
        "no random number for the State Box region generation: {0}; is /dev/urandom available?"
    )]
    Random(std::io::Error),
    /// Box id 0 means "free slot" in the ABI.
    #[error("State Box id 0 is reserved for free slots: give the session a nonzero id")]
    ZeroId,
    /// A box with this id exists already.
    #[error("a State Box with id {id:#x} already exists: find() it or delete it first")]
    IdExists {
        /// The id.
        id: u64,
    },
    /// All slots are in use.
    #[error("all {slot_count} State Box slots are in use: delete finished sessions or create the region with more slots")]
    Full {
        /// The region's slot count.
        slot_count: u32,
    },
    /// The handle's box was deleted (or never belonged to this region).
    #[error("State Box handle (slot {slot}, id {id:#x}, generation {generation}) is stale: the box was deleted; find() the id again")]
    Stale {
        /// The handle's slot.
        slot: u32,
        /// The handle's id.
        id: u64,
        /// The handle's generation.
        generation: u64,
    },
    /// The box's memory no longer holds what this process published (something wrote over it).
    #[error("State Box in slot {slot} does not hold what was published: {reason}")]
    Corrupt {
        /// The slot.
        slot: u32,
        /// What is wrong.
        reason: String,
    },
}

/// A box of a [`Region`]: which slot, and which box (id and generation) it must still hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoxHandle {
    /// The slot that holds the box.
    pub slot: u32,
    /// The box's id (the application's session id).
    pub id: u64,
    /// The box's generation (new for each created box).
    pub generation: u64,
}

/// Set while a Region exists: the fixed address allows one per process.
static OPEN: AtomicBool = AtomicBool::new(false);

/// Clears [`OPEN`] when dropped.
#[derive(Debug)]
struct OpenToken;

impl OpenToken {
    fn take() -> Result<OpenToken, RegionError> {
        OPEN.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| OpenToken)
            .map_err(|_| RegionError::AlreadyOpen)
    }
}

impl Drop for OpenToken {
    fn drop(&mut self) {
        OPEN.store(false, Ordering::Release);
    }
}

/// The process's State Box region (see the module docs for the thread rules).
#[derive(Debug)]
pub struct Region {
    // Field order is drop order: unmap before allowing another Region.
    map: Mapping,
    header: Header,
    /// Free slots, the lowest on top: create_box pops in O(1).
    free: Vec<u32>,
    /// The boxes in use: id -> (slot, generation).
    live: HashMap<u64, (u32, u64)>,
    _open: OpenToken,
}

// SAFETY: the Region owns its mapping exclusively and keeps no thread-bound state; moving it to
// another thread moves that ownership.
unsafe impl Send for Region {}
// SAFETY: every `&self` method only reads the mapping (and the seq words atomically); all writes
// take `&mut self`, so shared references never race with a write from this process.
unsafe impl Sync for Region {}

impl Region {
    /// Maps the process's region of `slot_count` boxes of at most `capacity` bytes each at
    /// [`STATEBOX_VA`](crate::abi::STATEBOX_VA), locks it in RAM and writes its header.
    pub fn create(slot_count: u32, capacity: u32) -> Result<Region, RegionError> {
        let mut header = Header::new(slot_count, capacity)?;
        header.region_generation = crate::random::nonzero_u64().map_err(RegionError::Random)?;
        header.next_generation = 1;
        let open = OpenToken::take()?;
        let len = usize::try_from(header.region_bytes()).map_err(|_| {
            AbiError::BadGeometry(format!(
                "region of {} bytes does not fit the address space",
                header.region_bytes()
            ))
        })?;
        let map = Mapping::new(len)?;
        let mut region = Region {
            map,
            header,
            free: (0..slot_count).rev().collect(),
            live: HashMap::new(),
            _open: open,
        };
        region.write_header();
        Ok(region)
    }

    /// Writes the header, the magic last (release) so a reader never takes a half-written
    /// header for a valid one.
    fn write_header(&mut self) {
        let bytes = self.header.encode();
        // SAFETY: the mapping is at least one page (HEADER_BYTES) long and `&mut self` excludes
        // every other reference into it from this process.
        let head = unsafe { std::slice::from_raw_parts_mut(self.map.ptr(), bytes.len()) };
        head[8..].copy_from_slice(&bytes[8..]);
        self.word(0).store(abi::MAGIC, Ordering::Release);
    }

    /// The u64 at `offset` (8-aligned, inside the mapping) as an atomic.
    fn word(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset % 8 == 0 && offset + 8 <= self.map.len());
        // SAFETY: callers pass 8-aligned offsets inside the mapping (header fields and slot seq
        // words: slot offsets are HEADER_BYTES + slot * slot_size, slot_size a multiple of 64);
        // the mapping is page aligned and lives as long as `&self`; AtomicU64 has u64's layout.
        unsafe { &*self.map.ptr().add(offset).cast::<AtomicU64>() }
    }

    fn slot_offset(&self, slot: u32) -> Option<usize> {
        usize::try_from(self.header.slot_offset(slot)?).ok()
    }

    fn seq(&self, slot_offset: usize) -> &AtomicU64 {
        self.word(slot_offset)
    }

    /// Publishes {id, generation, data} into `slot`: the inactive copy whole, then seq + 2.
    fn publish(
        &mut self,
        slot: u32,
        id: u64,
        generation: u64,
        data: &[u8],
    ) -> Result<(), RegionError> {
        let capacity = self.header.capacity;
        if data.len() > usize::try_from(capacity).unwrap_or(usize::MAX) {
            return Err(AbiError::DataTooLarge {
                len: data.len(),
                capacity,
            }
            .into());
        }
        let Some(slot_off) = self.slot_offset(slot) else {
            return Err(AbiError::NoSuchSlot {
                slot,
                slot_count: self.header.slot_count,
            }
            .into());
        };
        // Only this process writes seq, under `&mut self`.
        let seq = self.seq(slot_off).load(Ordering::Relaxed);
        let inactive = abi::active_copy(seq) ^ 1;
        let copy_off = slot_off + usize::try_from(self.header.copy_offset(inactive)).unwrap_or(0);
        let copy_size = usize::try_from(self.header.copy_size()).unwrap_or(0);
        // SAFETY: the copy lies inside the slot, inside the mapping (geometry validated by
        // Header::new); `&mut self` excludes every other reference into the mapping from this
        // process, and the copy does not overlap the seq word. Readers outside the process
        // ignore the inactive copy until seq changes below.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(self.map.ptr().add(copy_off), copy_size) };
        abi::write_copy(dst, capacity, id, generation, data)?;
        self.seq(slot_off)
            .store(seq.wrapping_add(2), Ordering::Release);
        Ok(())
    }

    /// Checks that `b` names a box of this region that still exists.
    fn check_handle(&self, b: &BoxHandle) -> Result<(), RegionError> {
        match self.live.get(&b.id) {
            Some(&(slot, generation)) if slot == b.slot && generation == b.generation => Ok(()),
            _ => Err(RegionError::Stale {
                slot: b.slot,
                id: b.id,
                generation: b.generation,
            }),
        }
    }

    /// Creates an empty box for session `id` (nonzero, not in use) in a free slot.
    pub fn create_box(&mut self, id: u64) -> Result<BoxHandle, RegionError> {
        if id == 0 {
            return Err(RegionError::ZeroId);
        }
        if self.live.contains_key(&id) {
            return Err(RegionError::IdExists { id });
        }
        let slot = self.free.pop().ok_or(RegionError::Full {
            slot_count: self.header.slot_count,
        })?;
        let generation = self.header.next_generation;
        self.header.next_generation = generation.wrapping_add(1).max(1);
        self.word(HDR_NEXT_GENERATION)
            .store(self.header.next_generation, Ordering::Release);
        if let Err(e) = self.publish(slot, id, generation, &[]) {
            self.free.push(slot);
            return Err(e);
        }
        self.live.insert(id, (slot, generation));
        Ok(BoxHandle {
            slot,
            id,
            generation,
        })
    }

    /// Publishes `data` (at most the capacity) as box `b`'s state.
    pub fn export(&mut self, b: &BoxHandle, data: &[u8]) -> Result<(), RegionError> {
        self.check_handle(b)?;
        self.publish(b.slot, b.id, b.generation, data)
    }

    /// Reads box `b`'s state back from the region (validated as a monitor would) into `out`.
    pub fn import(&self, b: &BoxHandle, out: &mut Vec<u8>) -> Result<(), RegionError> {
        self.check_handle(b)?;
        let bytes = self.slot_bytes(b.slot).ok_or(RegionError::Stale {
            slot: b.slot,
            id: b.id,
            generation: b.generation,
        })?;
        let corrupt = |reason: String| RegionError::Corrupt {
            slot: b.slot,
            reason,
        };
        match abi::parse_slot_ref(&self.header, b.slot, bytes) {
            Ok(Some(r)) if r.id == b.id && r.generation == b.generation => {
                out.clear();
                out.extend_from_slice(r.data);
                Ok(())
            }
            Ok(Some(r)) => Err(corrupt(format!(
                "it holds box {:#x} generation {} instead of {:#x} generation {}",
                r.id, r.generation, b.id, b.generation
            ))),
            Ok(None) => Err(corrupt("the slot is free".to_string())),
            Err(e) => Err(corrupt(e.to_string())),
        }
    }

    /// Deletes box `b`: its slot is published free and may be reused by a new box.
    pub fn delete(&mut self, b: BoxHandle) -> Result<(), RegionError> {
        self.check_handle(&b)?;
        self.publish(b.slot, 0, 0, &[])?;
        self.live.remove(&b.id);
        self.free.push(b.slot);
        Ok(())
    }

    /// The box of session `id`, if it exists.
    pub fn find(&self, id: u64) -> Option<BoxHandle> {
        self.live.get(&id).map(|&(slot, generation)| BoxHandle {
            slot,
            id,
            generation,
        })
    }

    /// Every box in use, by slot.
    pub fn boxes(&self) -> Vec<BoxHandle> {
        let mut v: Vec<BoxHandle> = self
            .live
            .iter()
            .map(|(&id, &(slot, generation))| BoxHandle {
                slot,
                id,
                generation,
            })
            .collect();
        v.sort_by_key(|b| b.slot);
        v
    }

    /// The region's header as published (next_generation included).
    pub fn header(&self) -> Header {
        self.header
    }

    /// The bytes of slot `slot`.
    fn slot_bytes(&self, slot: u32) -> Option<&[u8]> {
        self.header.slot_bytes(self.as_bytes(), slot)
    }

    /// The whole region as bytes (what a monitor reads; parse it with [`crate::abi`]).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes, readable, and lives as long as `&self`; this
        // process writes it only under `&mut self`, which cannot coexist with this borrow.
        unsafe { std::slice::from_raw_parts(self.map.ptr(), self.map.len()) }
    }
}
