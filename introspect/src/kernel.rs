//! Finding a running Linux kernel in guest memory: its KASLR slide, physical base and direct-map
//! base, from a page-table root (CR3) and symbols (System.map, or the Sensor Box descriptor of a
//! patched guest), validated by a signature before anything else trusts them.

use std::collections::HashMap;
use std::path::Path;

use crate::mem::PhysMem;
use crate::paging::{PageWalker, PagingError};
use crate::sensorbox::ExternalState;

/// Where the kernel image is mapped before any slide (`__START_KERNEL_map`).
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// The KASLR slide is a multiple of this (`CONFIG_PHYSICAL_ALIGN`).
const SLIDE_ALIGN: u64 = 2 << 20;
/// The kernel image must lie below this (the module area starts here).
const KERNEL_IMAGE_END: u64 = 0xffff_ffff_c000_0000;
/// Largest System.map we read.
const MAX_SYSTEM_MAP: u64 = 64 << 20;
/// What `linux_banner` starts with.
const BANNER: &[u8] = b"Linux version ";

/// Why the kernel could not be located.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A symbol we need is missing.
    #[error("symbol {0} not found (wrong System.map for this kernel?)")]
    NoSymbol(&'static str),
    /// System.map unreadable.
    #[error("cannot read System.map {0}: {1}")]
    SystemMap(String, std::io::Error),
    /// Translation failed.
    #[error(transparent)]
    Paging(#[from] PagingError),
    /// No slide made the kernel's banner appear.
    #[error("no KASLR slide maps linux_banner under CR3 {0:#x}: is the guest running Linux, and does System.map match it?")]
    NotFound(u64),
    /// The located kernel failed its check.
    #[error("located kernel fails validation: {0}")]
    Invalid(String),
}

/// Kernel symbols (name → link-time address).
#[derive(Clone, Debug, Default)]
pub struct Symbols(HashMap<String, u64>);

impl Symbols {
    /// Parses System.map text; malformed lines are skipped.
    pub fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter_map(|l| {
                    let mut it = l.split_whitespace();
                    let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                    let _kind = it.next()?;
                    Some((it.next()?.to_string(), addr))
                })
                .collect(),
        )
    }

    /// Reads a System.map file.
    pub fn from_file(path: &Path) -> Result<Self, KernelError> {
        let err = |e| KernelError::SystemMap(path.display().to_string(), e);
        let len = std::fs::metadata(path).map_err(err)?.len();
        if len > MAX_SYSTEM_MAP {
            return Err(err(std::io::Error::other(
                "file too large for a System.map",
            )));
        }
        Ok(Self::parse(&std::fs::read_to_string(path).map_err(err)?))
    }

    /// A symbol's link-time address.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.get(name).copied()
    }

    fn need(&self, name: &'static str) -> Result<u64, KernelError> {
        self.get(name).ok_or(KernelError::NoSymbol(name))
    }

    /// Every symbol (name, link-time address), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.0.iter().map(|(n, &a)| (n.as_str(), a))
    }

    /// How many symbols.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, u64)> for Symbols {
    /// A later symbol of the same name wins, as in [`Symbols::parse`].
    fn from_iter<I: IntoIterator<Item = (String, u64)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// A located, validated kernel.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KernelLocation {
    /// Virtual KASLR slide (run-time minus link-time addresses).
    pub slide: u64,
    /// `phys_base`: physical = virtual − `START_KERNEL_MAP` + `phys_base` in the kernel image.
    pub phys_base: u64,
    /// Base of the direct map of all physical memory.
    pub page_offset_base: u64,
    /// Root of the page tables used (kernel half).
    pub cr3: u64,
    /// Paging levels.
    pub levels: u8,
}

impl KernelLocation {
    /// Physical address of a kernel-image virtual address.
    pub fn image_phys(&self, va: u64) -> u64 {
        va.wrapping_sub(START_KERNEL_MAP)
            .wrapping_add(self.phys_base)
    }
}

fn banner_at(pw: &PageWalker, va: u64) -> bool {
    let mut b = [0u8; BANNER.len()];
    pw.read(va, &mut b).is_ok() && b == BANNER
}

/// The paging levels CR4 selects (LA57 is bit 12).
pub fn levels_from_cr4(cr4: u64) -> u8 {
    if cr4 & (1 << 12) != 0 {
        5
    } else {
        4
    }
}

/// The page-table roots worth trying for the kernel half: CR3 itself and, with page-table
/// isolation, the kernel PGD next to a user one.
fn roots(cr3: u64) -> [u64; 2] {
    let root = cr3 & 0x000f_ffff_ffff_f000;
    [root, root & !0x1000]
}

/// Finds the kernel from CR3 and System.map symbols: tries every aligned slide until
/// `linux_banner` reads as a banner, then reads `phys_base` and `page_offset_base`.
pub fn locate(
    mem: &dyn PhysMem,
    cr3: u64,
    cr4: u64,
    syms: &Symbols,
) -> Result<KernelLocation, KernelError> {
    let banner = syms.need("linux_banner")?;
    let text = syms.need("_text")?;
    // The paging mode CR4 names first, then the other (CR4 is one register read); whatever is
    // found is validated by the banner, three ways.
    let first = levels_from_cr4(cr4);
    let other = if first == 5 { 4 } else { 5 };
    for (root, levels) in roots(cr3)
        .into_iter()
        .flat_map(|r| [(r, first), (r, other)])
    {
        let pw = PageWalker::new(mem, root, levels)?;
        let mut slide = 0u64;
        while text.saturating_add(slide) < KERNEL_IMAGE_END {
            if banner_at(&pw, banner + slide) {
                return finish(&pw, slide, syms, root, levels);
            }
            slide += SLIDE_ALIGN;
        }
    }
    Err(KernelError::NotFound(cr3))
}

/// The location for a known `slide` (from the kernel's own symbol table): reads `phys_base` and
/// `page_offset_base` and cross-checks the banner, as [`locate`] does for the slide it finds.
pub fn locate_at(
    mem: &dyn PhysMem,
    root: u64,
    levels: u8,
    syms: &Symbols,
    slide: u64,
) -> Result<KernelLocation, KernelError> {
    let pw = PageWalker::new(mem, root, levels)?;
    finish(&pw, slide, syms, root & 0x000f_ffff_ffff_f000, levels)
}

fn finish(
    pw: &PageWalker,
    slide: u64,
    syms: &Symbols,
    root: u64,
    levels: u8,
) -> Result<KernelLocation, KernelError> {
    let phys_base = pw.read_u64(syms.need("phys_base")? + slide)?;
    let page_offset_base = match syms.get("page_offset_base") {
        Some(a) => pw.read_u64(a + slide)?,
        // Without CONFIG_RANDOMIZE_MEMORY the direct map sits at its fixed base.
        None if levels == 5 => 0xff11_0000_0000_0000,
        None => 0xffff_8880_0000_0000,
    };
    let loc = KernelLocation {
        slide,
        phys_base,
        page_offset_base,
        cr3: root,
        levels,
    };
    validate(pw, &loc, syms.need("linux_banner")? + slide)?;
    Ok(loc)
}

/// Builds the location from a patched guest's Sensor Box descriptor (no System.map needed).
pub fn from_descriptor(
    mem: &dyn PhysMem,
    st: &ExternalState,
    cr3: u64,
) -> Result<KernelLocation, KernelError> {
    let levels = match st.pgtable_levels {
        4 => 4u8,
        5 => 5,
        other => {
            return Err(KernelError::Invalid(format!(
                "descriptor says {other}-level paging"
            )))
        }
    };
    let root = if cr3 == 0 { st.init_top_pgt_phys } else { cr3 };
    let pw = PageWalker::new(mem, root, levels)?;
    let loc = KernelLocation {
        slide: st.kaslr_offset,
        phys_base: st.phys_base,
        page_offset_base: st.page_offset_base,
        cr3: root & 0x000f_ffff_ffff_f000,
        levels,
    };
    validate(&pw, &loc, st.linux_banner)?;
    Ok(loc)
}

/// Cross-checks a location: the banner must read the same through the page tables, through the
/// kernel-image formula and through the direct map.
fn validate(pw: &PageWalker, loc: &KernelLocation, banner_va: u64) -> Result<(), KernelError> {
    if !banner_at(pw, banner_va) {
        return Err(KernelError::Invalid(format!("no banner at {banner_va:#x}")));
    }
    let phys = pw.translate(banner_va)?.phys;
    if loc.image_phys(banner_va) != phys {
        return Err(KernelError::Invalid(format!(
            "phys_base {:#x} puts the banner at {:#x}, the page tables at {phys:#x}",
            loc.phys_base,
            loc.image_phys(banner_va)
        )));
    }
    let direct = loc.page_offset_base.wrapping_add(phys);
    if !banner_at(pw, direct) {
        return Err(KernelError::Invalid(format!(
            "the direct map at {:#x} does not show the banner",
            loc.page_offset_base
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_map_parsing_skips_garbage() {
        let s = Symbols::parse(
            "ffffffff81000000 T _text\nnot a line\nzz T bad\nffffffff82000000 D linux_banner\n",
        );
        assert_eq!(s.get("_text"), Some(0xffff_ffff_8100_0000));
        assert_eq!(s.get("linux_banner"), Some(0xffff_ffff_8200_0000));
        assert_eq!(s.get("bad"), None);
        assert_eq!(levels_from_cr4(1 << 12), 5);
        assert_eq!(roots(0x1234_0000 | 0x1000 | 7), [0x1234_1000, 0x1234_0000]);
    }
}
