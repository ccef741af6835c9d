//! The kernel's own symbol table, found and decoded in a copy of its read-only data: no
//! System.map needed.
//!
//! Every distribution kernel carries kallsyms, emitted by `scripts/kallsyms` into `.rodata` as
//! consecutive, 8-byte-aligned tables:
//!
//! * `kallsyms_num_syms` (u32) and `kallsyms_names`: per symbol a length (one byte, or two with
//!   the high bit of the first set, Linux ≥ 6.1) and that many token indices; the first expanded
//!   byte is the symbol's type letter;
//! * `kallsyms_markers`: u32 offsets into the names of every 256th symbol;
//! * `kallsyms_token_table`: 256 NUL-terminated tokens, and `kallsyms_token_index`: 256 u16
//!   offsets of them;
//! * `kallsyms_offsets` (s32 per symbol) and `kallsyms_relative_base` (u64, relocated with the
//!   kernel, so a run-time address) — before `num_syms` up to Linux 6.3, after the token index
//!   from 6.4 on. Between markers and token table, Linux 6.2 and 6.3 (and Debian's 6.1, which
//!   has it backported) put `kallsyms_seqs_of_names`, 3 bytes per symbol; from 6.4 it is last.
//!
//! The search starts from what every kernel's token table holds — the single-character tokens
//! "0" to "9" in a row, since digits occur in symbol names — and every table found is checked
//! against the others: the token index must describe the token table byte for byte, the markers
//! must fall exactly on every 256th name, the names must end where the markers begin, `num_syms`
//! must agree with the markers, and the decoded addresses must be sorted (the tool sorts them).
//! All of it runs on a byte slice, bounded by its length and by [`MAX_SYMBOLS`]: a hostile guest
//! can make the search fail, never loop, over-read or allocate without bound. The fuzz target
//! `kallsyms` drives [`find`].

use crate::le::{u16_at, u32_at, u64_at};

/// Most symbols decoded (Debian's 6.12 cloud kernel has about 120,000).
pub const MAX_SYMBOLS: u32 = 1 << 21;
/// Longest expanded symbol, type letter included (`KSYM_NAME_LEN` is 512 since 6.1).
const MAX_NAME: usize = 1024;
/// How many places with "0\01\0…9\0" are tried.
const MAX_TOKEN_CANDIDATES: usize = 64;
/// How far after the digit tokens the token index may start.
const MAX_TOKEN_TABLE: usize = 64 << 10;
/// Bytes one name may take in the table (a two-byte length and its tokens).
const MAX_ENTRY: usize = 2 + 0x3fff;
/// Name entries all checks of one search may step over together: what bounds a hostile region
/// full of near-misses (a real table is checked once, in about its symbol count).
const MAX_STEPS: u64 = 1 << 24;
/// The kernel image region: a relative base must lie in it.
const IMAGE: std::ops::Range<u64> = 0xffff_ffff_8000_0000..0xffff_ffff_c000_0000;

const DIGITS: &[u8; 20] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";

/// Why no symbol table was found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KallsymsError {
    /// The region is not 8-byte aligned.
    #[error("the region at {0:#x} is not 8-byte aligned")]
    Unaligned(u64),
    /// No token table.
    #[error(
        "no kallsyms token table in {0} bytes of read-only data (a kernel built without \
         CONFIG_KALLSYMS, or not a Linux kernel)"
    )]
    NoTokenTable(usize),
    /// Token table found, the rest not.
    #[error(
        "kallsyms token table at {0:#x}, but no markers, names and symbol count that agree with \
         it (Linux 6.2/6.3 layout, or corrupt): give the guest's System.map and vmlinux"
    )]
    NoNames(u64),
    /// Names found, offsets not.
    #[error(
        "kallsyms names at {0:#x}, but no sorted kallsyms_offsets with a relative base in the \
         kernel image (a kernel without CONFIG_KALLSYMS_BASE_RELATIVE?)"
    )]
    NoOffsets(u64),
}

/// One symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// Name.
    pub name: String,
    /// `nm` type letter (`T`, `t`, `D`, `d`, `R`, `B`, `A`, …).
    pub kind: char,
    /// Run-time address (per-CPU symbols: their offset in each CPU's area).
    pub addr: u64,
    /// An absolute (per-CPU) symbol: not moved by KASLR.
    pub absolute: bool,
}

/// Which of the two table orders the kernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Layout {
    /// Offsets and relative base before `num_syms` (Linux ≤ 6.3).
    OffsetsFirst,
    /// Offsets and relative base after the token index (Linux ≥ 6.4).
    OffsetsLast,
}

/// A decoded symbol table.
#[derive(Clone, Debug)]
pub struct Kallsyms {
    /// Symbols in address order.
    pub symbols: Vec<Symbol>,
    /// `kallsyms_relative_base` (run time).
    pub relative_base: u64,
    /// Per-CPU symbols are absolute (`CONFIG_KALLSYMS_ABSOLUTE_PERCPU`).
    pub absolute_percpu: bool,
    /// The table order.
    pub layout: Layout,
    /// Virtual address of `kallsyms_token_table`.
    pub token_table: u64,
}

impl Kallsyms {
    /// The first symbol called `name`.
    pub fn get(&self, name: &str) -> Option<&Symbol> {
        self.symbols.iter().find(|s| s.name == name)
    }
}

fn align8(x: usize) -> Option<usize> {
    x.checked_add(7).map(|v| v & !7)
}

/// Token table: the 256 tokens as byte ranges of the region.
struct Tokens {
    table: usize,
    index: usize,
    ranges: Vec<(usize, usize)>,
}

/// Checks that the 256 u16s at `at` index a token table holding the digit tokens at `digits`.
fn check_index(b: &[u8], digits: usize, at: usize) -> Option<Tokens> {
    if u16_at(b, at)? != 0 || u16_at(b, at + 2)? == 0 {
        return None;
    }
    let idx: Vec<usize> = (0..256)
        .map(|i| u16_at(b, at + i * 2).map(usize::from))
        .collect::<Option<_>>()?;
    if idx[0] != 0 || idx.windows(2).any(|w| w[1] <= w[0]) {
        return None;
    }
    let table = digits.checked_sub(idx[usize::from(b'0')])?;
    let mut ranges = Vec::with_capacity(256);
    for i in 0..256 {
        let start = table + idx[i];
        let end = match idx.get(i + 1) {
            Some(next) => table + next - 1,
            None => start + b.get(start..at)?.iter().position(|&c| c == 0)?,
        };
        let tok = b.get(start..end)?;
        if tok.is_empty() || tok.contains(&0) || b.get(end) != Some(&0) {
            return None;
        }
        ranges.push((start, end));
    }
    for d in 0..10u8 {
        let (s, e) = ranges[usize::from(b'0' + d)];
        if b.get(s..e)? != [b'0' + d] {
            return None;
        }
    }
    let table_end = ranges[255].1 + 1;
    let pad = b.get(table_end..at)?;
    if pad.len() >= 8 || pad.iter().any(|&c| c != 0) {
        return None;
    }
    Some(Tokens {
        table,
        index: at,
        ranges,
    })
}

fn find_tokens(b: &[u8]) -> Option<Tokens> {
    let hits = b
        .windows(DIGITS.len())
        .enumerate()
        .filter(|(p, w)| *w == DIGITS && *p > 0 && b.get(p - 1) == Some(&0))
        .map(|(p, _)| p)
        .take(MAX_TOKEN_CANDIDATES);
    for p in hits {
        let first = align8(p + DIGITS.len())?;
        let last = (p + MAX_TOKEN_TABLE).min(b.len());
        for at in (first..last).step_by(8) {
            if let Some(t) = check_index(b, p, at) {
                return Some(t);
            }
        }
    }
    None
}

/// Markers ending at `end` (exclusive), read backwards down to the first one, which is 0.
fn markers_before(b: &[u8], end: usize) -> Option<(usize, Vec<u32>)> {
    let max = usize::try_from(MAX_SYMBOLS / 256 + 1).ok()?;
    let mut vals = Vec::new();
    let mut at = end;
    loop {
        at = at.checked_sub(4)?;
        let v = u32_at(b, at)?;
        if vals.last().is_some_and(|&next| v >= next) || vals.len() >= max {
            return None;
        }
        // 256 names take at least 512 bytes (a length and a token each).
        if vals.last().is_some_and(|&next| next - v < 512) {
            return None;
        }
        vals.push(v);
        if v == 0 {
            vals.reverse();
            return Some((at, vals));
        }
    }
}

/// Names and count when `kallsyms_seqs_of_names` (3 bytes per symbol, Linux 6.2 and 6.3, and
/// backported to some 6.1 stable kernels) sits between the markers and the token table at `t`:
/// every size it can have is tried, and the count the names give must be the one it implies.
fn with_seqs(b: &[u8], t: usize, steps: &mut u64) -> Option<(usize, usize)> {
    let most = usize::try_from(MAX_SYMBOLS).ok()?.checked_mul(3)?;
    for size in (8..=most.min(t)).step_by(8) {
        *steps += 1;
        if *steps > MAX_STEPS {
            return None;
        }
        let end = t - size;
        for e in [end, end.saturating_sub(4)] {
            let Some((mstart, markers)) = markers_before(b, e) else {
                continue;
            };
            if let Some((names, n)) = find_names(b, &markers, mstart, steps) {
                if align8(n.checked_mul(3)?) == Some(size) {
                    return Some((names, n));
                }
            }
        }
    }
    None
}

/// Length of the name entry at `pos`: (header bytes, token count).
fn entry_len(b: &[u8], pos: usize) -> Option<(usize, usize)> {
    let first = usize::from(*b.get(pos)?);
    if first & 0x80 == 0 {
        return Some((1, first));
    }
    let second = usize::from(*b.get(pos + 1)?);
    Some((2, (first & 0x7f) | (second << 7)))
}

/// Checks `n` names starting at `start` against the markers and the end of the names.
fn names_fit(
    b: &[u8],
    start: usize,
    n: usize,
    markers: &[u32],
    end: usize,
    steps: &mut u64,
) -> bool {
    let mut pos = start;
    for i in 0..n {
        *steps += 1;
        if *steps > MAX_STEPS {
            return false;
        }
        if i % 256 == 0 {
            let Some(&m) = markers.get(i / 256) else {
                return false;
            };
            if usize::try_from(m).ok() != Some(pos - start) {
                return false;
            }
        }
        let Some((hdr, len)) = entry_len(b, pos) else {
            return false;
        };
        if len == 0 {
            return false;
        }
        pos += hdr + len;
        if pos > end {
            return false;
        }
    }
    end - pos < 8 && b.get(pos..end).is_some_and(|p| p.iter().all(|&c| c == 0))
}

/// Names table start and symbol count, given markers at `mstart`.
fn find_names(b: &[u8], markers: &[u32], mstart: usize, steps: &mut u64) -> Option<(usize, usize)> {
    let k = markers.len();
    let last = usize::try_from(*markers.last()?).ok()?;
    let hi = mstart.checked_sub(last)?;
    let lo = hi.saturating_sub(256 * MAX_ENTRY).max(8);
    let mut s = hi & !7;
    while s >= lo && *steps <= MAX_STEPS {
        *steps += 1;
        let n = u32_at(b, s - 8).and_then(|v| usize::try_from(v).ok());
        if let Some(n) = n {
            if n > 256 * (k - 1)
                && n <= 256 * k
                && u32_at(b, s - 4) == Some(0)
                && names_fit(b, s, n, markers, mstart, steps)
            {
                return Some((s, n));
            }
        }
        s = s.checked_sub(8)?;
    }
    None
}

fn addresses(b: &[u8], offsets: usize, n: usize, base: u64) -> Option<(Vec<(u64, bool)>, bool)> {
    let raw: Vec<[u8; 4]> = (0..n)
        .map(|i| crate::le::array_at(b, offsets.checked_add(i.checked_mul(4)?)?))
        .collect::<Option<_>>()?;
    // With absolute per-CPU symbols, every relocatable symbol has a negative offset.
    let absolute_percpu = raw.iter().any(|&o| i32::from_le_bytes(o) < 0);
    let addrs: Vec<(u64, bool)> = raw
        .iter()
        .map(|&o| {
            let signed = i32::from_le_bytes(o);
            let magnitude = u64::from(signed.unsigned_abs());
            if !absolute_percpu {
                (base.wrapping_add(u64::from(u32::from_le_bytes(o))), false)
            } else if signed >= 0 {
                (magnitude, true)
            } else {
                // base - 1 - signed, with signed < 0.
                (base.wrapping_sub(1).wrapping_add(magnitude), false)
            }
        })
        .collect();
    if addrs.windows(2).any(|w| w[1].0 < w[0].0) {
        return None;
    }
    Some((addrs, absolute_percpu))
}

fn expand(b: &[u8], tokens: &Tokens, pos: usize) -> Option<(char, String)> {
    let (hdr, len) = entry_len(b, pos)?;
    let mut out = Vec::new();
    for &t in b.get(pos + hdr..pos + hdr + len)? {
        let (s, e) = tokens.ranges[usize::from(t)];
        out.extend_from_slice(b.get(s..e)?);
        if out.len() > MAX_NAME {
            return None;
        }
    }
    let (&kind, name) = out.split_first()?;
    Some((char::from(kind), String::from_utf8_lossy(name).into_owned()))
}

/// Finds and decodes kallsyms in `region`, a copy of the kernel's read-only data that starts at
/// virtual address `va` (8-byte aligned).
pub fn find(region: &[u8], va: u64) -> Result<Kallsyms, KallsymsError> {
    if va % 8 != 0 {
        return Err(KallsymsError::Unaligned(va));
    }
    let b = region;
    let tokens = find_tokens(b).ok_or(KallsymsError::NoTokenTable(b.len()))?;
    let at = |off: usize| va.wrapping_add(off as u64);
    let no_names = KallsymsError::NoNames(at(tokens.table));
    // The markers end at the token table, or 4 bytes before it (alignment).
    let mut steps = 0u64;
    let (names, n) = [tokens.table, tokens.table.saturating_sub(4)]
        .into_iter()
        .filter_map(|end| markers_before(b, end))
        .find_map(|(mstart, markers)| find_names(b, &markers, mstart, &mut steps))
        .or_else(|| with_seqs(b, tokens.table, &mut steps))
        .ok_or(no_names)?;
    let size = align8(n * 4).ok_or(KallsymsError::NoOffsets(at(names)))?;
    // ≤ 6.3: offsets, relative base, num_syms, names. ≥ 6.4: token index, offsets, base.
    let first = names
        .checked_sub(16)
        .and_then(|rb| Some((Layout::OffsetsFirst, rb.checked_sub(size)?, rb)));
    let last = align8(tokens.index + 512).map(|o| (Layout::OffsetsLast, o, o + size));
    let (layout, (addrs, absolute_percpu), relative_base) = [first, last]
        .into_iter()
        .flatten()
        .find_map(|(layout, offsets, rb)| {
            let base = u64_at(b, rb).filter(|v| IMAGE.contains(v))?;
            Some((layout, addresses(b, offsets, n, base)?, base))
        })
        .ok_or(KallsymsError::NoOffsets(at(names)))?;
    let mut symbols = Vec::with_capacity(n);
    let mut pos = names;
    for (addr, absolute) in addrs {
        let (hdr, len) = entry_len(b, pos).ok_or(KallsymsError::NoNames(at(names)))?;
        let (kind, name) = expand(b, &tokens, pos).ok_or(KallsymsError::NoNames(at(names)))?;
        symbols.push(Symbol {
            name,
            kind,
            addr,
            absolute,
        });
        pos += hdr + len;
    }
    Ok(Kallsyms {
        symbols,
        relative_base,
        absolute_percpu,
        layout,
        token_table: at(tokens.table),
    })
}

#[cfg(test)]
pub(crate) mod tests;
