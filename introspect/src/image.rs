//! The kernel image's mappings, read from the guest's page tables: which parts of
//! `[__START_KERNEL_map, +1 GiB)` are mapped, where, and with which permissions. The read-only,
//! non-executable part is the kernel's read-only data, where its symbol table (kallsyms) and its
//! BTF live; [`crate::kallsyms`] searches only there.
//!
//! The walk reads the one page-directory-pointer entry that covers the image, its page directory
//! and at most 512 page tables: at most 515 table reads of 4 KiB whatever the guest wrote, and a
//! non-present entry is skipped, never followed.

use crate::kernel::START_KERNEL_MAP;
use crate::le::u64_at;
use crate::mem::{MemError, PhysMem};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const NO_EXEC: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// The image region is one 1 GiB page-directory-pointer entry.
const IMAGE_SPAN: u64 = 1 << 30;

/// One run of the image mapped to contiguous physical memory with one set of permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First virtual address.
    pub va: u64,
    /// Its guest-physical address.
    pub phys: u64,
    /// Bytes.
    pub len: u64,
    /// Writable at every level.
    pub writable: bool,
    /// Executable (no level sets NX).
    pub exec: bool,
}

impl Mapping {
    /// Read-only data: neither writable nor executable.
    pub fn is_rodata(&self) -> bool {
        !self.writable && !self.exec
    }
}

fn table(mem: &dyn PhysMem, phys: u64) -> Result<Vec<u8>, MemError> {
    let mut t = vec![0u8; 4096];
    mem.read(phys & ADDR_MASK, &mut t)?;
    Ok(t)
}

fn entry(t: &[u8], index: u64) -> u64 {
    usize::try_from(index * 8)
        .ok()
        .and_then(|o| u64_at(t, o))
        .unwrap_or(0)
}

/// Permissions accumulated down the levels: writable only if every level allows it, executable
/// only if no level forbids it.
#[derive(Clone, Copy)]
struct Perm {
    writable: bool,
    exec: bool,
}

impl Perm {
    fn with(self, e: u64) -> Perm {
        Perm {
            writable: self.writable && e & WRITABLE != 0,
            exec: self.exec && e & NO_EXEC == 0,
        }
    }
}

fn push(out: &mut Vec<Mapping>, va: u64, phys: u64, len: u64, p: Perm) {
    if let Some(last) = out.last_mut() {
        if last.va + last.len == va
            && last.phys + last.len == phys
            && last.writable == p.writable
            && last.exec == p.exec
        {
            last.len += len;
            return;
        }
    }
    out.push(Mapping {
        va,
        phys,
        len,
        writable: p.writable,
        exec: p.exec,
    });
}

/// The kernel image's mappings under the page-table root `root` (`levels` 4 or 5), in address
/// order, adjacent pages merged. Empty if the image region is not mapped under this root.
pub fn mappings(mem: &dyn PhysMem, root: u64, levels: u8) -> Result<Vec<Mapping>, MemError> {
    let va = START_KERNEL_MAP;
    let mut perm = Perm {
        writable: true,
        exec: true,
    };
    let mut phys = root & ADDR_MASK;
    let mut out = Vec::new();
    // Down to the page-directory-pointer entry of the image (levels 5 and 4 index 511, then 510).
    for level in (3..=levels.clamp(4, 5)).rev() {
        let shift = 12 + 9 * (u32::from(level) - 1);
        let e = entry(&table(mem, phys)?, (va >> shift) & 0x1ff);
        if e & PRESENT == 0 {
            return Ok(out);
        }
        perm = perm.with(e);
        if level == 3 && e & PAGE_SIZE_BIT != 0 {
            push(
                &mut out,
                va,
                e & ADDR_MASK & !(IMAGE_SPAN - 1),
                IMAGE_SPAN,
                perm,
            );
            return Ok(out);
        }
        phys = e & ADDR_MASK;
    }
    let pmd = table(mem, phys)?;
    for i in 0..512u64 {
        let e = entry(&pmd, i);
        if e & PRESENT == 0 {
            continue;
        }
        let at = va + (i << 21);
        let p = perm.with(e);
        if e & PAGE_SIZE_BIT != 0 {
            push(&mut out, at, e & ADDR_MASK & !((1 << 21) - 1), 1 << 21, p);
            continue;
        }
        let pte = table(mem, e)?;
        for j in 0..512u64 {
            let f = entry(&pte, j);
            if f & PRESENT != 0 {
                push(&mut out, at + (j << 12), f & ADDR_MASK, 4096, p.with(f));
            }
        }
    }
    Ok(out)
}

/// Runs of the image that are virtually contiguous and read-only data, each a list of mappings.
pub fn rodata_runs(maps: &[Mapping]) -> Vec<Vec<Mapping>> {
    let mut runs: Vec<Vec<Mapping>> = Vec::new();
    for m in maps.iter().filter(|m| m.is_rodata()) {
        match runs.last_mut() {
            Some(run) if run.last().is_some_and(|l| l.va + l.len == m.va) => run.push(*m),
            _ => runs.push(vec![*m]),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::VecMem;

    /// Page tables at 0x1000.. mapping a fake image: 2 MiB of text, 4 KiB pages of rodata, a
    /// 2 MiB page of data.
    #[test]
    fn the_image_is_read_with_its_permissions_and_merged() {
        let mut m = vec![0u8; 0x10000];
        let set =
            |m: &mut Vec<u8>, at: usize, v: u64| m[at..at + 8].copy_from_slice(&v.to_le_bytes());
        // PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000, PT at 0x4000.
        set(&mut m, 0x1000 + 511 * 8, 0x2000 | 3);
        set(&mut m, 0x2000 + 510 * 8, 0x3000 | 3);
        // _text at +16 MiB: PD index 8, 2 MiB executable read-only.
        set(&mut m, 0x3000 + 8 * 8, 0x100_0000 | PAGE_SIZE_BIT | 1);
        // rodata: PD index 9 -> PT with two read-only NX pages.
        set(&mut m, 0x3000 + 9 * 8, 0x4000 | 3);
        set(&mut m, 0x4000, 0x120_0000 | NO_EXEC | 1);
        set(&mut m, 0x4008, 0x120_1000 | NO_EXEC | 1);
        // data: PD index 10, writable NX.
        set(
            &mut m,
            0x3000 + 10 * 8,
            0x140_0000 | PAGE_SIZE_BIT | NO_EXEC | 3,
        );
        let mem = VecMem::new(0, m);
        let maps = mappings(&mem, 0x1000, 4).unwrap();
        assert_eq!(maps.len(), 3, "{maps:?}");
        assert!(maps[0].exec && !maps[0].writable);
        assert_eq!(maps[0].va, START_KERNEL_MAP + (16 << 20));
        assert_eq!((maps[1].len, maps[1].phys), (8192, 0x120_0000));
        assert!(maps[1].is_rodata());
        assert!(maps[2].writable && !maps[2].exec);
        assert_eq!(rodata_runs(&maps).len(), 1);
        // Nothing mapped: nothing found, no error.
        let empty = VecMem::new(0, vec![0u8; 0x2000]);
        assert!(mappings(&empty, 0x1000, 5).unwrap().is_empty());
    }
}
