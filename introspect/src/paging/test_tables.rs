//! Page tables built in a byte vector, for the tests of the walker and its users.

use std::cell::Cell;

use super::{PageWalker, ADDR_MASK, PAGE_SIZE_BIT, PRESENT};
use crate::mem::{MemError, PhysMem, VecMem};

/// Memory that counts the calls that reach it (a `read_many` is one call).
pub(crate) struct Counting {
    /// The bytes.
    pub(crate) mem: VecMem,
    /// Calls so far.
    pub(crate) calls: Cell<u32>,
}

impl PhysMem for Counting {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.calls.set(self.calls.get() + 1);
        self.mem.read(gpa, buf)
    }
    fn read_many(&self, ranges: &mut [(u64, &mut [u8])]) -> Result<(), MemError> {
        self.calls.set(self.calls.get() + 1);
        for (gpa, buf) in ranges.iter_mut() {
            self.mem.read(*gpa, buf)?;
        }
        Ok(())
    }
    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), MemError> {
        self.mem.write(gpa, bytes)
    }
}

/// The root table's address; tables are allocated after it, one page each.
pub(crate) const ROOT: u64 = 0x1000;

/// Page tables of `levels` levels in `bytes` of memory, built by [`Tables::map`].
pub(crate) struct Tables {
    /// The memory, counting reads.
    pub(crate) m: Counting,
    levels: u8,
    next: Cell<u64>,
}

impl Tables {
    /// Empty tables; keep data frames clear of the first pages (one per table made).
    pub(crate) fn new(levels: u8, bytes: usize) -> Tables {
        Tables {
            m: Counting {
                mem: VecMem::new(0, vec![0; bytes]),
                calls: Cell::new(0),
            },
            levels,
            next: Cell::new(ROOT + 0x1000),
        }
    }

    /// Maps `va` with a page of `size` (4 KiB, 2 MiB or 1 GiB) at `phys`.
    pub(crate) fn map(&self, va: u64, phys: u64, size: u64) {
        let leaf = match size {
            0x1000 => 1,
            0x20_0000 => 2,
            _ => 3,
        };
        let mut table = ROOT;
        for level in (leaf + 1..=self.levels).rev() {
            let at = table + ((va >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff) * 8;
            let e = self.m.mem.read_u64(at).unwrap();
            table = if e & PRESENT != 0 {
                e & ADDR_MASK
            } else {
                let t = self.next.get();
                self.next.set(t + 0x1000);
                self.m.mem.write(at, &(t | 7).to_le_bytes()).unwrap();
                t
            };
        }
        let at = table + ((va >> (12 + 9 * (u32::from(leaf) - 1))) & 0x1ff) * 8;
        let flags = if leaf == 1 { 7 } else { 7 | PAGE_SIZE_BIT };
        self.m.mem.write(at, &(phys | flags).to_le_bytes()).unwrap();
    }

    /// A walker over these tables.
    pub(crate) fn walker(&self) -> PageWalker<'_> {
        PageWalker::new(&self.m, ROOT, self.levels).unwrap()
    }
}
