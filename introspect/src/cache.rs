//! A page cache over any guest-physical memory source, for reads while the guest is paused.
//!
//! A paused guest cannot change its memory, so a walk of its task list may keep every page it
//! read. [`CachedMem`] does that for any [`PhysMem`] (a bridge session, an RDMA transport): while
//! caching is on, a read that misses fetches the aligned block of `read_ahead` pages around it in
//! one inner read (kernel objects of one kind sit together, so a walk's next object is usually in
//! the block already fetched), and later reads of those pages cost nothing. Turning caching off
//! (the guest resumes) drops every page. Memory is bounded: the cache is emptied when full.
//!
//! [`PhysMem::read_many`] is the other way in: a caller that knows every range it needs (the
//! State Box extractor) gets what the cache holds from it and the rest in one inner `read_many`,
//! exactly the bytes asked for: no read-ahead (scattered pages would each drag in a whole block)
//! and nothing kept (such a caller reads each range once; whole pages kept cost more bytes and
//! copies than they save: measured in `tests/benches/statebox.rs`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use crate::conv::usize_from;
use crate::mem::{MemError, PhysMem};

/// Bytes in a page, the unit of the cache.
pub const PAGE: u64 = 4096;
const PAGE_LEN: usize = 4096;

/// A caching wrapper around a memory source.
pub struct CachedMem<M> {
    inner: M,
    pages: RefCell<HashMap<u64, Box<[u8]>>>,
    on: Cell<bool>,
    read_ahead: u64,
    max_pages: usize,
}

impl<M: PhysMem> CachedMem<M> {
    /// Caches reads of `inner` in blocks of `read_ahead` pages (at least 1), keeping at most
    /// `max_pages`. Caching starts off.
    pub fn new(inner: M, read_ahead: u64, max_pages: usize) -> Self {
        CachedMem {
            inner,
            pages: RefCell::new(HashMap::new()),
            on: Cell::new(false),
            read_ahead: read_ahead.max(1),
            max_pages: max_pages.max(1),
        }
    }

    /// Turns caching on (the guest is paused) or off (it runs); either way the cache is emptied.
    pub fn set_caching(&self, on: bool) {
        self.pages.borrow_mut().clear();
        self.on.set(on);
    }

    /// Pages held now.
    pub fn cached_pages(&self) -> usize {
        self.pages.borrow().len()
    }

    /// The source.
    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// Gives the source back.
    pub fn into_inner(self) -> M {
        self.inner
    }

    /// Copies `[gpa, gpa + buf.len())` out of the cached pages (all of which must be held).
    fn serve(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let (first, last) = page_span(gpa, buf.len())?;
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        let oor = || MemError::OutOfRange { gpa, len };
        let c = self.pages.borrow();
        let mut done = 0usize;
        for p in first..=last {
            let page = c.get(&p).ok_or_else(oor)?;
            let from = if p == first {
                usize_from(gpa % PAGE)
            } else {
                0
            };
            let n = (PAGE_LEN - from).min(buf.len() - done);
            let (Some(dst), Some(src)) = (buf.get_mut(done..done + n), page.get(from..from + n))
            else {
                return Err(oor());
            };
            dst.copy_from_slice(src);
            done += n;
        }
        Ok(())
    }

    /// Reads pages `first..first + count` from the source.
    fn fetch(&self, first: u64, count: u64) -> Result<Vec<u8>, MemError> {
        let (gpa, len) = (first.saturating_mul(PAGE), count.saturating_mul(PAGE));
        let mut b = vec![0u8; usize_from(len)];
        self.inner.read(gpa, &mut b)?;
        Ok(b)
    }
}

impl<M: PhysMem> PhysMem for CachedMem<M> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        if buf.is_empty() {
            return Ok(());
        }
        if !self.on.get() {
            return self.inner.read(gpa, buf);
        }
        let (first, last) = page_span(gpa, buf.len())?;
        let missing = {
            let c = self.pages.borrow();
            (first..=last).any(|p| !c.contains_key(&p))
        };
        if missing {
            // One read for the whole run, widened to the aligned block around it; where the wider
            // block is not all readable (the end of RAM, an ungranted range), just the run.
            let ra = self.read_ahead;
            let (ra_first, ra_last) = (first / ra * ra, (last / ra).saturating_add(1) * ra - 1);
            let (start, bytes) = match self.fetch(ra_first, ra_last - ra_first + 1) {
                Ok(b) => (ra_first, b),
                Err(_) => (first, self.fetch(first, last - first + 1)?),
            };
            let mut c = self.pages.borrow_mut();
            if c.len() + bytes.len() / PAGE_LEN > self.max_pages {
                c.clear();
            }
            for (page, chunk) in (start..).zip(bytes.chunks(PAGE_LEN)) {
                c.entry(page)
                    .or_insert_with(|| chunk.to_vec().into_boxed_slice());
            }
        }
        self.serve(gpa, buf)
    }

    /// While caching: a range whose pages are all held comes from the cache; the others go to
    /// the source together, exactly as asked (one inner `read_many`), and are not kept.
    fn read_many(&self, ranges: &mut [(u64, &mut [u8])]) -> Result<(), MemError> {
        if !self.on.get() {
            return self.inner.read_many(ranges);
        }
        let mut misses: Vec<(u64, &mut [u8])> = Vec::new();
        for (gpa, buf) in ranges.iter_mut() {
            if buf.is_empty() {
                continue;
            }
            let (first, last) = page_span(*gpa, buf.len())?;
            let held = {
                let c = self.pages.borrow();
                (first..=last).all(|p| c.contains_key(&p))
            };
            if held {
                self.serve(*gpa, buf)?;
            } else {
                misses.push((*gpa, &mut **buf));
            }
        }
        if misses.is_empty() {
            return Ok(());
        }
        self.inner.read_many(&mut misses)
    }

    fn read_fresh(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.inner.read_fresh(gpa, buf)
    }

    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), MemError> {
        self.inner.write(gpa, bytes)?;
        // Keep cached pages truthful.
        let mut c = self.pages.borrow_mut();
        for (a, b) in (gpa..).zip(bytes) {
            if let Some(p) = c.get_mut(&(a / PAGE)) {
                if let Some(slot) = p.get_mut(usize_from(a % PAGE)) {
                    *slot = *b;
                }
            }
        }
        Ok(())
    }
}

/// The first and last page of a non-empty `[gpa, gpa + len)`; an error if it overflows.
fn page_span(gpa: u64, len: usize) -> Result<(u64, u64), MemError> {
    let len = u64::try_from(len).map_err(|_| MemError::OutOfRange { gpa, len: 0 })?;
    let end = gpa
        .checked_add(len)
        .filter(|_| len > 0)
        .ok_or(MemError::OutOfRange { gpa, len })?;
    Ok((gpa / PAGE, (end - 1) / PAGE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::VecMem;

    /// Counts the reads that reach the source.
    struct Counting(VecMem, Cell<u32>);

    impl PhysMem for Counting {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.1.set(self.1.get() + 1);
            self.0.read(gpa, buf)
        }
        fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), MemError> {
            self.0.write(gpa, bytes)
        }
    }

    fn mem(pages: u64) -> CachedMem<Counting> {
        let bytes: Vec<u8> = (0..pages * PAGE)
            .map(|i| u8::try_from(i / PAGE).unwrap())
            .collect();
        CachedMem::new(Counting(VecMem::new(0, bytes), Cell::new(0)), 4, 64)
    }

    #[test]
    fn off_reads_through_on_fetches_blocks_once() {
        let m = mem(16);
        let mut b = [0u8; 8];
        m.read(PAGE + 8, &mut b).unwrap();
        m.read(PAGE + 8, &mut b).unwrap();
        assert_eq!(m.inner().1.get(), 2, "no caching while the guest runs");
        m.set_caching(true);
        m.read(PAGE + 8, &mut b).unwrap();
        assert_eq!(b, [1; 8]);
        m.read(3 * PAGE, &mut b).unwrap();
        assert_eq!(b, [3; 8]);
        assert_eq!(m.inner().1.get(), 3, "pages 0..4 came in one read");
        assert_eq!(m.cached_pages(), 4);
        // A read across a block boundary fetches the next block.
        let mut across = [0u8; 16];
        m.read(4 * PAGE - 8, &mut across).unwrap();
        assert_eq!(&across[..8], &[3; 8]);
        assert_eq!(&across[8..], &[4; 8]);
        assert_eq!(m.inner().1.get(), 4);
        m.set_caching(false);
        assert_eq!(m.cached_pages(), 0);
    }

    #[test]
    fn read_many_serves_hits_and_reads_the_misses_exactly_in_one_inner_call() {
        let m = mem(16);
        // Caching off: straight through, the default loop (one inner read per range).
        let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
        m.read_many(&mut [(PAGE, &mut a[..]), (9 * PAGE, &mut b[..])])
            .unwrap();
        assert_eq!((a, b), ([1; 4], [9; 4]));
        assert_eq!(m.inner().1.get(), 2);
        assert_eq!(m.cached_pages(), 0);

        m.set_caching(true);
        let mut x = [0u8; 8];
        m.read(2 * PAGE, &mut x).unwrap(); // pages 0..4 held (read-ahead)
        assert_eq!(m.inner().1.get(), 3);
        // Page 3 is held; pages 3-4 (half held), 6-7 and 12 are not.
        let (mut p3, mut p34, mut p67, mut p12) = ([0u8; 8], [0u8; 8], vec![0u8; 4100], [0u8; 1]);
        m.read_many(&mut [
            (3 * PAGE + 8, &mut p3[..]),
            (4 * PAGE - 4, &mut p34[..]),
            (6 * PAGE + 4092, &mut p67[..]),
            (12 * PAGE, &mut p12[..]),
            (5 * PAGE, &mut [][..]),
        ])
        .unwrap();
        assert_eq!(p3, [3; 8]);
        assert_eq!(p34, [3, 3, 3, 3, 4, 4, 4, 4]);
        assert!(p67[..4].iter().all(|&v| v == 6) && p67[4..].iter().all(|&v| v == 7));
        assert_eq!(p12, [12]);
        // Counting has the default read_many: one inner read per miss, no read-ahead, and
        // nothing more is kept.
        assert_eq!(m.inner().1.get(), 6);
        assert_eq!(m.cached_pages(), 4);
        // All held: nothing reaches the source.
        m.read_many(&mut [(PAGE, &mut p3[..]), (0, &mut p12[..])])
            .unwrap();
        assert_eq!(m.inner().1.get(), 6);
        assert_eq!((p3, p12), ([1; 8], [0]));
        // Past the end of memory: an error, not a panic.
        assert!(m.read_many(&mut [(16 * PAGE, &mut p3[..])]).is_err());
        assert!(m.read_many(&mut [(u64::MAX - 2, &mut p3[..])]).is_err());
    }

    #[test]
    fn writes_keep_cached_pages_truthful_and_the_end_of_memory_is_an_error() {
        let m = mem(6);
        m.set_caching(true);
        let mut b = [0u8; 4];
        m.read(2 * PAGE, &mut b).unwrap();
        m.write(2 * PAGE + 1, &[9, 9]).unwrap();
        m.read(2 * PAGE, &mut b).unwrap();
        assert_eq!(b, [2, 9, 9, 2]);
        // Pages 4..8 are not all there: the run alone is read.
        m.read(5 * PAGE, &mut b).unwrap();
        assert_eq!(b, [5; 4]);
        assert!(m.read(6 * PAGE, &mut b).is_err());
        assert!(m.read(u64::MAX - 1, &mut b).is_err());
    }
}
