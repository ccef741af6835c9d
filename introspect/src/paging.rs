//! x86-64 virtual-to-physical translation from a page-table root (CR3), 4- and 5-level paging,
//! 1 GiB and 2 MiB pages, with a translation cache.
//!
//! Page tables live in guest memory, so they are untrusted: a non-present entry is reported (never
//! followed), a walk has exactly `levels` steps, and every physical address read is checked by the
//! memory source.
//!
//! A whole range (a State Box region) is translated in a few reads by
//! [`PageWalker::map_prefix`], and read back in one batch by [`PageWalker::read_extents`].

mod extents;
#[cfg(test)]
pub(crate) mod test_tables;

pub use extents::{Extent, Mapped};

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use crate::conv::usize_from;
use crate::mem::{MemError, PhysMem};

const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Physical-address bits of a page-table entry (bits 12..51).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Most translations the cache keeps before it starts over.
const CACHE_LIMIT: usize = 1 << 16;

/// Why an address could not be translated.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PagingError {
    /// Reading a table failed.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// Not mapped.
    #[error("virtual address {va:#x} is not mapped (level-{level} entry {entry:#x} not present)")]
    NotPresent {
        /// The address.
        va: u64,
        /// The paging level whose entry was not present (5..1).
        level: u8,
        /// The entry's raw value.
        entry: u64,
    },
    /// Not a canonical address for this paging mode.
    #[error("virtual address {0:#x} is not canonical")]
    NonCanonical(u64),
    /// A paging mode we do not walk.
    #[error("{0}-level paging is not supported (4 or 5)")]
    Levels(u8),
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address.
    pub phys: u64,
    /// Size of the page that maps it (4 KiB, 2 MiB or 1 GiB).
    pub page_size: u64,
}

/// Cache statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Translations answered from the cache.
    pub hits: u64,
    /// Translations that walked the tables.
    pub misses: u64,
}

impl CacheStats {
    /// Hits over all lookups (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

/// Translates virtual addresses of one address space.
pub struct PageWalker<'m> {
    mem: &'m dyn PhysMem,
    root: u64,
    levels: u8,
    cache: RefCell<HashMap<u64, Translation>>,
    /// Upper-level entries [`PageWalker::map_prefix`] read, by physical address.
    upper: RefCell<HashMap<u64, u64>>,
    stats: Cell<CacheStats>,
}

impl<'m> PageWalker<'m> {
    /// A walker for the tables rooted at `cr3` (PCID and flag bits are ignored).
    pub fn new(mem: &'m dyn PhysMem, cr3: u64, levels: u8) -> Result<Self, PagingError> {
        if levels != 4 && levels != 5 {
            return Err(PagingError::Levels(levels));
        }
        Ok(Self {
            mem,
            root: cr3 & ADDR_MASK,
            levels,
            cache: RefCell::new(HashMap::new()),
            upper: RefCell::new(HashMap::new()),
            stats: Cell::new(CacheStats::default()),
        })
    }

    /// The page-table root (physical).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Paging levels.
    pub fn levels(&self) -> u8 {
        self.levels
    }

    /// The memory the walker reads.
    pub fn mem(&self) -> &'m dyn PhysMem {
        self.mem
    }

    fn canonical(&self, va: u64) -> bool {
        let bits = if self.levels == 5 { 57 } else { 48 };
        // Canonical: bits 63..bits-1 are all clear or all set (a sign extension of bit bits-1).
        let top = va >> (bits - 1);
        top == 0 || top == u64::MAX >> (bits - 1)
    }

    /// Walks the tables for `va` (no cache).
    pub fn walk(&self, va: u64) -> Result<Translation, PagingError> {
        if !self.canonical(va) {
            return Err(PagingError::NonCanonical(va));
        }
        let mut table = self.root;
        for level in (1..=self.levels).rev() {
            let shift = 12 + 9 * (u32::from(level) - 1);
            let index = (va >> shift) & 0x1ff;
            let entry = self.mem.read_u64(table + index * 8)?;
            if entry & PRESENT == 0 {
                return Err(PagingError::NotPresent { va, level, entry });
            }
            let large = (level == 2 || level == 3) && entry & PAGE_SIZE_BIT != 0;
            if large || level == 1 {
                let page_size = 1u64 << shift;
                let base = entry & ADDR_MASK & !(page_size - 1);
                return Ok(Translation {
                    phys: base | (va & (page_size - 1)),
                    page_size,
                });
            }
            table = entry & ADDR_MASK;
        }
        unreachable_walk(va)
    }

    /// Translates `va`, using and filling the cache.
    pub fn translate(&self, va: u64) -> Result<Translation, PagingError> {
        let page = va >> 12;
        let mut stats = self.stats.get();
        if let Some(t) = self.cache.borrow().get(&page) {
            stats.hits += 1;
            self.stats.set(stats);
            return Ok(Translation {
                phys: (t.phys & !0xfff) | (va & 0xfff),
                page_size: t.page_size,
            });
        }
        stats.misses += 1;
        self.stats.set(stats);
        let t = self.walk(va)?;
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(page, t);
        Ok(t)
    }

    /// Reads `buf.len()` bytes at virtual `va`, page by page.
    pub fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), PagingError> {
        let mut done = 0usize;
        while done < buf.len() {
            let cur = va.wrapping_add(done as u64);
            let t = self.translate(cur)?;
            let in_page = usize_from(4096 - (cur & 0xfff));
            let n = in_page.min(buf.len() - done);
            self.mem.read(t.phys, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Reads a little-endian u64 at virtual `va`.
    pub fn read_u64(&self, va: u64) -> Result<u64, PagingError> {
        let mut b = [0u8; 8];
        self.read(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Cache statistics so far.
    pub fn stats(&self) -> CacheStats {
        self.stats.get()
    }

    /// Forgets every cached translation (the guest ran and may have changed its tables).
    pub fn flush(&self) {
        self.cache.borrow_mut().clear();
        self.upper.borrow_mut().clear();
    }
}

/// A walk always returns at level 1; this keeps the compiler satisfied without a panic path.
fn unreachable_walk(va: u64) -> Result<Translation, PagingError> {
    Err(PagingError::NotPresent {
        va,
        level: 0,
        entry: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::VecMem;

    /// Builds tables in a 1 MiB buffer: 4 KiB, 2 MiB and 1 GiB mappings.
    fn tables(levels: u8) -> (VecMem, u64) {
        let mem = VecMem::new(0, vec![0u8; 1 << 20]);
        let w = |a: u64, v: u64| mem.write(a, &v.to_le_bytes()).unwrap();
        let root = 0x1000u64;
        let (mut top, mut next) = (root, 0x2000u64);
        if levels == 5 {
            // PML5[0] -> PML4
            w(root, next | 3);
            top = next;
            next += 0x1000;
        }
        let pdpt = next;
        let pd = next + 0x1000;
        let pt = next + 0x2000;
        w(top, pdpt | 3); // PML4[0]
        w(pdpt, pd | 3); // PDPT[0] -> PD
        w(pdpt + 8, 0x4000_0000 | 0x83); // PDPT[1]: 1 GiB page at 1 GiB
        w(pd, pt | 3); // PD[0] -> PT
        w(pd + 8, 0x0060_0000 | 0x83); // PD[1]: 2 MiB page at 6 MiB
        w(pt + 5 * 8, 0x000a_b000 | 3); // PT[5]: 4 KiB page
        (mem, root)
    }

    #[test]
    fn translates_all_page_sizes_in_both_modes() {
        for levels in [4u8, 5] {
            let (mem, root) = tables(levels);
            let pw = PageWalker::new(&mem, root | 0x7 /* PCID bits */, levels).unwrap();
            assert_eq!(
                pw.translate(0x5123).unwrap(),
                Translation {
                    phys: 0xab123,
                    page_size: 4096
                }
            );
            assert_eq!(pw.translate(0x20_1234).unwrap().phys, 0x60_1234);
            assert_eq!(pw.translate(0x20_1234).unwrap().page_size, 2 << 20);
            assert_eq!(
                pw.translate(0x4000_0000 + 77).unwrap().phys,
                0x4000_0000 + 77
            );
            assert!(matches!(
                pw.translate(0x6000),
                Err(PagingError::NotPresent { level: 1, .. })
            ));
            assert!(matches!(
                pw.translate(0x8000_0000),
                Err(PagingError::NotPresent { level: 3, .. })
            ));
            assert!(matches!(
                pw.translate(0x0000_8000_0000_0000),
                Err(PagingError::NonCanonical(_)) | Err(PagingError::NotPresent { .. })
            ));
            let _ = pw.translate(0x5000).unwrap();
            assert!(pw.stats().hits >= 1);
        }
    }

    #[test]
    fn canonical_means_the_top_bits_copy_the_highest_translated_bit() {
        let mem = VecMem::new(0, vec![0u8; 8192]);
        let (pw4, pw5) = (
            PageWalker::new(&mem, 0, 4).unwrap(),
            PageWalker::new(&mem, 0, 5).unwrap(),
        );
        for (va, in4, in5) in [
            (0, true, true),
            (0x0000_7fff_ffff_ffff, true, true),
            (0x0000_8000_0000_0000, false, true),
            (0xffff_8000_0000_0000, true, true),
            (0xffff_7fff_ffff_ffff, false, true),
            (0x00ff_ffff_ffff_ffff, false, true),
            (0x0100_0000_0000_0000, false, false),
            (0xff00_0000_0000_0000, false, true),
            (0xfeff_ffff_ffff_ffff, false, false),
            (u64::MAX, true, true),
        ] {
            assert_eq!(pw4.canonical(va), in4, "{va:#x} with 4 levels");
            assert_eq!(pw5.canonical(va), in5, "{va:#x} with 5 levels");
        }
    }

    #[test]
    fn hostile_tables_end_in_errors() {
        let mem = VecMem::new(0, vec![0xffu8; 8192]);
        // Every entry present, pointing far outside memory.
        let pw = PageWalker::new(&mem, 0, 4).unwrap();
        assert!(matches!(pw.translate(0x1234), Err(PagingError::Mem(_))));
        assert!(PageWalker::new(&mem, 0, 3).is_err());
    }

    #[test]
    fn reads_across_page_boundaries() {
        let (mem, root) = tables(4);
        // Map PT[6] to a different frame than the physical successor of PT[5]'s frame.
        mem.write(0x4000 + 6 * 8, &(0x000c_0000u64 | 3).to_le_bytes())
            .unwrap();
        mem.write(0xabffe, b"AB").unwrap();
        mem.write(0xc0000, b"CD").unwrap();
        let pw = PageWalker::new(&mem, root, 4).unwrap();
        let mut buf = [0u8; 4];
        pw.read(0x5ffe, &mut buf).unwrap();
        assert_eq!(&buf, b"ABCD");
    }
}
