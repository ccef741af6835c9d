//! A stock kernel's symbols and types found in its own memory: no System.map, no vmlinux.
//!
//! From CR3 alone: the page tables give the kernel image's mappings ([`crate::image`]); its
//! read-only data is copied (the guest may run: none of it changes while the kernel runs) and
//! searched for kallsyms ([`crate::kallsyms`]); the BTF blob is the range `__start_BTF` ..
//! `__stop_BTF` of those symbols (or, if the table does not name them, found by its header,
//! [`crate::btf::locate`]); the KASLR slide, `phys_base` and the direct map follow from the
//! symbols and are cross-checked as for System.map ([`kernel::locate_at`]).
//!
//! Symbols are kept at their link-time addresses (run-time address minus the slide) so that the
//! rest of the crate treats them exactly like System.map's. The slide is measured from `_text`
//! against the x86-64 default link address [`LINK_TEXT`]; for a kernel linked elsewhere the slide
//! is a different number, and every address still comes out right.

use crate::btf::{self, Btf};
use crate::image::{self, Mapping};
use crate::kallsyms::{self, Kallsyms, KallsymsError};
use crate::kernel::{self, KernelLocation, Symbols};
use crate::mem::{MemError, PhysMem};
use crate::paging::PageWalker;

/// Where `_text` is linked on x86-64 (`__START_KERNEL_map` + `CONFIG_PHYSICAL_START`).
pub const LINK_TEXT: u64 = 0xffff_ffff_8100_0000;
/// Most read-only data copied out of a guest (a distribution kernel has 10–30 MB).
pub const MAX_RODATA: u64 = 256 << 20;
/// Largest BTF blob taken from a guest.
const MAX_BTF: u64 = 64 << 20;

/// Why the kernel could not be found in memory.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// Nothing mapped where the kernel image lives.
    #[error(
        "no kernel image is mapped under CR3 {0:#x} (is the guest running Linux yet? it may \
         still be booting)"
    )]
    NoImage(u64),
    /// No read-only data in the image.
    #[error("the kernel image under CR3 {0:#x} has no read-only, non-executable pages")]
    NoRodata(u64),
    /// The symbol table.
    #[error("{0}")]
    Kallsyms(KallsymsError),
    /// The table lacks symbols the walk needs.
    #[error(
        "the kernel's symbol table has no {0} (a kernel built without CONFIG_KALLSYMS_ALL lists \
         functions only): give the guest's System.map and vmlinux"
    )]
    NoSymbol(&'static str),
    /// No BTF.
    #[error(
        "no BTF in the kernel's read-only data (a kernel built without CONFIG_DEBUG_INFO_BTF): \
         give the guest's System.map and vmlinux"
    )]
    NoBtf,
    /// The BTF blob the symbols name does not parse.
    #[error("the kernel's BTF at {at:#x}: {source}")]
    Btf {
        /// Its address.
        at: u64,
        /// Why.
        source: btf::BtfError,
    },
    /// The kernel's place in memory.
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    /// Guest memory.
    #[error(transparent)]
    Mem(#[from] MemError),
}

impl DiscoverError {
    /// True if a fresh CR3 may succeed where this one failed: the page tables read through it
    /// went away or changed (its process exited) rather than the kernel lacking something.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DiscoverError::NoImage(_)
                | DiscoverError::NoRodata(_)
                | DiscoverError::Kernel(_)
                | DiscoverError::Kallsyms(_)
        )
    }
}

/// What was found, and how.
pub struct Found {
    /// Symbols at link-time addresses, like System.map's.
    pub symbols: Symbols,
    /// The kernel's types.
    pub btf: Btf,
    /// Where the kernel sits.
    pub loc: KernelLocation,
    /// The decoded table (run-time addresses).
    pub kallsyms: Kallsyms,
    /// Bytes of read-only data copied.
    pub rodata_bytes: u64,
}

/// One virtually contiguous run of read-only data, copied.
struct Run {
    va: u64,
    bytes: Vec<u8>,
}

fn copy(mem: &dyn PhysMem, run: &[Mapping]) -> Result<Run, MemError> {
    let va = run.first().map_or(0, |m| m.va);
    let len: u64 = run.iter().map(|m| m.len).sum();
    let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
    let mut at = 0usize;
    for m in run {
        let n = usize::try_from(m.len).unwrap_or(0);
        // 1 MiB per read: a bridge session reads large ranges through, one READ each.
        for (i, chunk) in bytes[at..at + n].chunks_mut(1 << 20).enumerate() {
            mem.read(m.phys + ((i as u64) << 20), chunk)?;
        }
        at += n;
    }
    Ok(Run { va, bytes })
}

/// The image's mappings under the first root that maps it.
fn mappings(mem: &dyn PhysMem, cr3: u64, levels: u8) -> Result<(u64, Vec<Mapping>), DiscoverError> {
    let root = cr3 & 0x000f_ffff_ffff_f000;
    // With page-table isolation CR3 may be the user half; the kernel's PGD is the page below.
    for r in [root, root & !0x1000] {
        let maps = image::mappings(mem, r, levels)?;
        if maps.iter().any(|m| m.exec) {
            return Ok((r, maps));
        }
    }
    Err(DiscoverError::NoImage(cr3))
}

/// Finds the kernel, its symbols and its types from `cr3`/`cr4` and memory alone. Reads only
/// what does not change while the kernel runs: the guest need not be paused.
///
/// The paging mode CR4 names is tried first and then the other one (CR4 is one register read;
/// every table found is validated whichever mode found it). The page table is CR3's only until
/// the symbols are found; then the kernel's own `init_top_pgt` (see `stable_root`).
pub fn discover(mem: &dyn PhysMem, cr3: u64, cr4: u64) -> Result<Found, DiscoverError> {
    let levels = kernel::levels_from_cr4(cr4);
    let other = if levels == 5 { 4 } else { 5 };
    discover_with(mem, cr3, levels)
        .or_else(|first| discover_with(mem, cr3, other).map_err(|_| first))
}

fn discover_with(mem: &dyn PhysMem, cr3: u64, levels: u8) -> Result<Found, DiscoverError> {
    let (root, maps) = mappings(mem, cr3, levels)?;
    let mut runs = image::rodata_runs(&maps);
    if runs.is_empty() {
        return Err(DiscoverError::NoRodata(cr3));
    }
    // The largest run first: kallsyms and BTF sit in the main read-only data.
    runs.sort_by_key(|r| std::cmp::Reverse(r.iter().map(|m| m.len).sum::<u64>()));
    let mut copied = Vec::new();
    let mut total = 0u64;
    let mut last_err = KallsymsError::NoTokenTable(0);
    let mut found = None;
    for run in &runs {
        let len: u64 = run.iter().map(|m| m.len).sum();
        if total + len > MAX_RODATA {
            continue;
        }
        total += len;
        let r = copy(mem, run)?;
        match kallsyms::find(&r.bytes, r.va) {
            Ok(k) => {
                found = Some(k);
                copied.push(r);
                break;
            }
            Err(e) => last_err = e,
        }
        copied.push(r);
    }
    let ks = found.ok_or(DiscoverError::Kallsyms(last_err))?;
    let root = stable_root(mem, root, levels, &ks, &maps);
    let btf = find_btf(mem, root, levels, &ks, &copied)?;
    let text = ks.get("_text").map_or(ks.relative_base, |s| s.addr);
    let slide = text.wrapping_sub(LINK_TEXT);
    let symbols: Symbols = ks
        .symbols
        .iter()
        .map(|s| {
            let link = if s.absolute {
                s.addr
            } else {
                s.addr.wrapping_sub(slide)
            };
            (s.name.clone(), link)
        })
        .collect();
    let loc = kernel::locate_at(mem, root, levels, &symbols, slide)?;
    Ok(Found {
        symbols,
        btf,
        loc,
        kallsyms: ks,
        rodata_bytes: total,
    })
}

/// The kernel's own top-level page table (`init_top_pgt`, which lives as long as the kernel) in
/// place of CR3's: CR3 belongs to whatever process ran when it was read, and with the guest
/// running that process may exit and its page table be freed and reused while this module still
/// reads through it (a fork bomb's processes do, all the time). The image is physically
/// contiguous, so the table's physical address follows from any image mapping; it is taken only
/// if it maps the image the same way. Otherwise CR3's root is kept.
fn stable_root(mem: &dyn PhysMem, root: u64, levels: u8, ks: &Kallsyms, maps: &[Mapping]) -> u64 {
    let (Some(pgt), Some(m)) = (ks.get("init_top_pgt"), maps.first()) else {
        return root;
    };
    // physical = virtual - __START_KERNEL_map + phys_base, for the whole image.
    let phys_base = m
        .phys
        .wrapping_sub(m.va.wrapping_sub(kernel::START_KERNEL_MAP));
    let candidate = pgt
        .addr
        .wrapping_sub(kernel::START_KERNEL_MAP)
        .wrapping_add(phys_base);
    let same = PageWalker::new(mem, candidate, levels)
        .and_then(|pw| pw.walk(m.va))
        .is_ok_and(|t| t.phys == m.phys);
    if same {
        candidate & 0x000f_ffff_ffff_f000
    } else {
        root
    }
}

fn find_btf(
    mem: &dyn PhysMem,
    root: u64,
    levels: u8,
    ks: &Kallsyms,
    copied: &[Run],
) -> Result<Btf, DiscoverError> {
    let addr = |n| ks.get(n).map(|s| s.addr);
    if let (Some(start), Some(stop)) = (addr("__start_BTF"), addr("__stop_BTF")) {
        let len = stop.checked_sub(start).filter(|&l| l > 0 && l <= MAX_BTF);
        let len = len.ok_or(DiscoverError::NoBtf)?;
        let parse = |blob: &[u8]| {
            Btf::parse(blob).map_err(|source| DiscoverError::Btf { at: start, source })
        };
        // Usually inside what was copied already.
        for r in copied {
            let off = start.wrapping_sub(r.va);
            if let Some(blob) = usize::try_from(off)
                .ok()
                .and_then(|o| r.bytes.get(o..o.checked_add(usize::try_from(len).ok()?)?))
            {
                return parse(blob);
            }
        }
        let pw = PageWalker::new(mem, root, levels).map_err(kernel::KernelError::from)?;
        let mut blob = vec![0u8; usize::try_from(len).unwrap_or(0)];
        pw.read(start, &mut blob)
            .map_err(kernel::KernelError::from)?;
        return parse(&blob);
    }
    copied
        .iter()
        .find_map(|r| btf::locate::find(&r.bytes).map(|(_, _, b)| b))
        .ok_or(DiscoverError::NoBtf)
}
