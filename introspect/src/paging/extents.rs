//! Translating a whole virtual range in a few reads, and reading it back in one batch.
//!
//! [`PageWalker::translate`] walks every page on its own: `levels` dependent reads each time it
//! misses its cache. A range of consecutive pages shares everything above its page tables, so
//! [`PageWalker::map_prefix`] reads the upper entries once per 2 MiB span (an entry the walker
//! has read before is not read again, until [`PageWalker::flush`]), then the span's whole run of page-table entries in
//! ONE read (at most 512 entries, 4 KiB), and gives the range back as physically contiguous
//! [`Extent`]s. [`PageWalker::read_extents`] then fetches any part of the range with one
//! [`crate::mem::PhysMem::read_many`]. Every table read goes through `read_many` as well, so a caching
//! source fetches the table page and no read-ahead block around it.

use crate::conv::usize_from;

use super::{PageWalker, PagingError, ADDR_MASK, PAGE_SIZE_BIT, PRESENT};

/// Bytes one page-table entry maps at level 1, and the span one page table covers.
const PAGE: u64 = 4096;
const SPAN: u64 = 2 << 20;

/// Virtual pages `[va, va + len)` that sit at `[phys, phys + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Virtual start.
    pub va: u64,
    /// Physical start.
    pub phys: u64,
    /// Bytes.
    pub len: u64,
}

/// What [`PageWalker::map_prefix`] found: the range's mapped beginning, and why it ends early.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    /// Consecutive extents from the range's start, physically contiguous pages merged.
    pub extents: Vec<Extent>,
    /// The first page not mapped (a [`PagingError::NotPresent`]), if the range is not wholly
    /// mapped: the extents cover the range up to it.
    pub stop: Option<PagingError>,
}

impl Mapped {
    /// Bytes mapped from the range's start.
    pub fn len(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// True if nothing at the range's start is mapped.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    fn push(&mut self, va: u64, phys: u64, len: u64) {
        if let Some(last) = self.extents.last_mut() {
            if last.va + last.len == va && last.phys.checked_add(last.len) == Some(phys) {
                last.len += len;
                return;
            }
        }
        self.extents.push(Extent { va, phys, len });
    }
}

impl PageWalker<'_> {
    /// Translates `[va, va + len)` from its start for as long as it is mapped (4 KiB, 2 MiB and
    /// 1 GiB pages; 4 or 5 levels): upper entries once per 2 MiB span, each span's page-table
    /// entries in one read. An entry that is not present ends the walk ([`Mapped::stop`]);
    /// reading a table that fails, or a range that leaves the canonical addresses, is an error.
    /// The caller bounds `len` (the work is one read per span plus the upper levels).
    pub fn map_prefix(&self, va: u64, len: u64) -> Result<Mapped, PagingError> {
        let end = va.checked_add(len).ok_or(PagingError::NonCanonical(va))?;
        if len > 0 && !self.canonical(end - 1) {
            return Err(PagingError::NonCanonical(end - 1));
        }
        let mut out = Mapped {
            extents: Vec::new(),
            stop: None,
        };
        let mut cur = va;
        'spans: while cur < end {
            if !self.canonical(cur) {
                return Err(PagingError::NonCanonical(cur));
            }
            let mut table = self.root;
            for level in (2..=self.levels).rev() {
                let shift = 12 + 9 * (u32::from(level) - 1);
                let at = table + ((cur >> shift) & 0x1ff) * 8;
                let entry = self.upper_entry(at)?;
                if entry & PRESENT == 0 {
                    out.stop = Some(PagingError::NotPresent {
                        va: cur,
                        level,
                        entry,
                    });
                    return Ok(out);
                }
                if (level == 2 || level == 3) && entry & PAGE_SIZE_BIT != 0 {
                    let size = 1u64 << shift;
                    let base = entry & ADDR_MASK & !(size - 1);
                    let page_end = (cur | (size - 1)).saturating_add(1).min(end);
                    out.push(cur, base | (cur & (size - 1)), page_end - cur);
                    cur = page_end;
                    continue 'spans;
                }
                table = entry & ADDR_MASK;
            }
            // `table` is the page table of cur's 2 MiB span: its entries for the range, at once.
            let span_end = (cur | (SPAN - 1)).saturating_add(1).min(end);
            let first = (cur >> 12) & 0x1ff;
            let count = ((span_end - 1) >> 12) - (cur >> 12) + 1;
            let ptes = self.read_entries(table + first * 8, count)?;
            for (k, entry) in (0u64..).zip(ptes) {
                let page_va = ((cur >> 12) + k) << 12;
                let from = page_va.max(cur);
                if entry & PRESENT == 0 {
                    out.stop = Some(PagingError::NotPresent {
                        va: from,
                        level: 1,
                        entry,
                    });
                    return Ok(out);
                }
                let to = page_va.saturating_add(PAGE).min(span_end);
                out.push(from, (entry & ADDR_MASK) | (from & (PAGE - 1)), to - from);
            }
            cur = span_end;
        }
        Ok(out)
    }

    /// Reads `[va, va + buf.len())` through `extents` (from [`PageWalker::map_prefix`]) with one
    /// [`crate::mem::PhysMem::read_many`]. A part of it that no extent covers is a
    /// [`PagingError::NotPresent`].
    pub fn read_extents(
        &self,
        extents: &[Extent],
        va: u64,
        buf: &mut [u8],
    ) -> Result<(), PagingError> {
        let mut ranges: Vec<(u64, &mut [u8])> = Vec::new();
        let mut rest = buf;
        let mut cur = va;
        for e in extents {
            if rest.is_empty() {
                break;
            }
            let e_end = e.va.saturating_add(e.len);
            if e_end <= cur {
                continue;
            }
            if e.va > cur {
                break;
            }
            let n = usize_from((e_end - cur).min(rest.len() as u64));
            let (head, tail) = rest.split_at_mut(n);
            ranges.push((e.phys + (cur - e.va), head));
            rest = tail;
            cur += n as u64;
        }
        if !rest.is_empty() {
            return Err(PagingError::NotPresent {
                va: cur,
                level: 0,
                entry: 0,
            });
        }
        self.mem.read_many(&mut ranges)?;
        Ok(())
    }

    /// The upper-level entry at physical `at`: read once, then kept (spans under one table
    /// share it) until [`PageWalker::flush`].
    fn upper_entry(&self, at: u64) -> Result<u64, PagingError> {
        if let Some(&e) = self.upper.borrow().get(&at) {
            return Ok(e);
        }
        let e = self.read_entries(at, 1)?.first().copied().unwrap_or(0);
        let mut upper = self.upper.borrow_mut();
        if upper.len() >= super::CACHE_LIMIT {
            upper.clear();
        }
        upper.insert(at, e);
        Ok(e)
    }

    /// `count` consecutive table entries at physical `at`, in one read (no read-ahead).
    fn read_entries(&self, at: u64, count: u64) -> Result<Vec<u64>, PagingError> {
        let mut raw = vec![0u8; usize_from(count * 8)];
        self.mem.read_many(&mut [(at, &mut raw[..])])?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::PhysMem;
    use crate::paging::test_tables::Tables;

    /// A va 16 KiB before a 2 MiB boundary, so that 8 pages span two page tables.
    const VA: u64 = 0x3bd0_0000_0000 + SPAN - 4 * PAGE;

    #[test]
    fn a_range_over_two_page_tables_in_one_read_per_table() {
        for levels in [4u8, 5] {
            let t = Tables::new(levels, 8 << 20);
            // Pages 0-1 and 4-5 physically consecutive, the rest scattered.
            let frames = [
                0x40_0000u64,
                0x40_1000,
                0x50_0000,
                0x48_0000,
                0x60_0000,
                0x60_1000,
            ];
            for (k, f) in (0u64..).zip(frames) {
                t.map(VA + k * PAGE, f, PAGE);
            }
            t.m.calls.set(0);
            let pw = t.walker();
            let m = pw.map_prefix(VA, 6 * PAGE).unwrap();
            assert_eq!(m.stop, None);
            assert_eq!(
                m.extents,
                vec![
                    Extent {
                        va: VA,
                        phys: 0x40_0000,
                        len: 2 * PAGE
                    },
                    Extent {
                        va: VA + 2 * PAGE,
                        phys: 0x50_0000,
                        len: PAGE
                    },
                    Extent {
                        va: VA + 3 * PAGE,
                        phys: 0x48_0000,
                        len: PAGE
                    },
                    Extent {
                        va: VA + 4 * PAGE,
                        phys: 0x60_0000,
                        len: 2 * PAGE
                    },
                ]
            );
            // The upper levels once, each page table's run once, the second span's PDE.
            assert_eq!(t.m.calls.get(), u32::from(levels - 1) + 1 + 1 + 1);
            assert_eq!(pw.translate(VA + 5 * PAGE + 9).unwrap().phys, 0x60_1009);

            // Read across all of them in one batch, from the middle of the first page.
            for (k, f) in (0u64..).zip(frames) {
                t.m.mem
                    .write(f, &[u8::try_from(k).unwrap() + 1; 4096])
                    .unwrap();
            }
            t.m.calls.set(0);
            let mut buf = vec![0u8; 5 * 4096];
            pw.read_extents(&m.extents, VA + 2048, &mut buf).unwrap();
            assert_eq!(t.m.calls.get(), 1);
            for (i, b) in buf.iter().enumerate() {
                assert_eq!(usize::from(*b), (i + 2048) / 4096 + 1, "byte {i}");
            }
            // Past what the extents cover: not present.
            let mut more = vec![0u8; 4096];
            assert!(matches!(
                pw.read_extents(&m.extents, VA + 5 * PAGE + 1, &mut more),
                Err(PagingError::NotPresent { va, .. }) if va == VA + 6 * PAGE
            ));
        }
    }

    #[test]
    fn a_hole_ends_the_prefix_and_says_where() {
        let t = Tables::new(4, 8 << 20);
        for k in [0u64, 1, 2, 4] {
            t.map(VA + k * PAGE, 0x40_0000 + k * PAGE, PAGE);
        }
        let pw = t.walker();
        let m = pw.map_prefix(VA, 8 * PAGE).unwrap();
        assert_eq!(m.len(), 3 * PAGE);
        assert_eq!(m.extents.len(), 1);
        assert!(matches!(
            m.stop,
            Some(PagingError::NotPresent { va, level: 1, .. }) if va == VA + 3 * PAGE
        ));
        // Nothing at all: the upper level that is missing.
        let m = pw.map_prefix(0x10_0000_0000, PAGE).unwrap();
        assert!(m.is_empty());
        assert!(matches!(
            m.stop,
            Some(PagingError::NotPresent { level: 4, .. })
        ));
        // Non-canonical and overflowing ranges are errors.
        assert!(matches!(
            pw.map_prefix(0x7fff_ffff_f000, 2 * PAGE),
            Err(PagingError::NonCanonical(0x8000_0000_0fff))
        ));
        assert!(pw.map_prefix(u64::MAX - 5, 10).is_err());
    }

    #[test]
    fn large_pages_are_one_extent_each() {
        let t = Tables::new(4, 8 << 20);
        let base = 0x3bd0_0000_0000u64; // 1 GiB aligned
        t.map(base, 0x20_0000, SPAN); // 2 MiB page
        t.map(base + SPAN, 0x60_0000, PAGE); // then a page table
        t.map(base + 1 + (1 << 30) - 1, 0x4000_0000, 1 << 30); // the next GiB: a 1 GiB page
        let pw = t.walker();
        let m = pw.map_prefix(base + 0x234, SPAN).unwrap();
        assert_eq!(m.stop, None);
        assert_eq!(
            m.extents,
            vec![
                Extent {
                    va: base + 0x234,
                    phys: 0x20_0234,
                    len: SPAN - 0x234
                },
                Extent {
                    va: base + SPAN,
                    phys: 0x60_0000,
                    len: 0x234
                },
            ]
        );
        // The last 2 MiB of the first GiB has no page directory entry.
        let m = pw.map_prefix(base + (1 << 30) - PAGE, 3 * SPAN).unwrap();
        assert!(matches!(
            m.stop,
            Some(PagingError::NotPresent { level: 2, .. })
        ));
        assert!(m.is_empty());
        let m = pw.map_prefix(base + (1 << 30) + 5, 3 * SPAN).unwrap();
        assert_eq!(m.stop, None);
        assert_eq!(
            m.extents,
            vec![Extent {
                va: base + (1 << 30) + 5,
                phys: 0x4000_0005,
                len: 3 * SPAN
            }]
        );
        // The translation the walker gives agrees.
        assert_eq!(pw.walk(base + (1 << 30) + 5).unwrap().phys, 0x4000_0005);
    }
}
