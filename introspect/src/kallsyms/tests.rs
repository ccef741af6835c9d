//! The decoder against tables laid out the way `scripts/kallsyms` lays them out, in both orders,
//! with and without absolute per-CPU symbols, and against broken ones.

#![allow(
    // Test fixtures: small, fixed values built by the test itself.
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]
use super::*;

/// What a test symbol is: name, type letter, address, absolute.
pub(crate) type Sym<'a> = (&'a str, char, u64, bool);

/// Substrings given to the byte values names do not use, as the real tool's compression does.
const COMPOUNDS: [&str; 8] = [
    "init_", "task", "_lock", "per_cpu", "linux", "banner", "__", "st",
];

fn pad8(out: &mut Vec<u8>) {
    while out.len() % 8 != 0 {
        out.push(0);
    }
}

/// Builds the kallsyms tables for `syms` (sorted by address) at offset `prefix` of a region
/// filled before with `prefix` bytes of junk. Returns the region.
pub(crate) fn encode(syms: &[Sym], layout: Layout, prefix: usize) -> Vec<u8> {
    encode_with(syms, layout, prefix, false)
}

/// As [`encode`]; `seqs` puts `kallsyms_seqs_of_names` between markers and token table (Linux
/// 6.2/6.3 and Debian's 6.1).
pub(crate) fn encode_with(syms: &[Sym], layout: Layout, prefix: usize, seqs: bool) -> Vec<u8> {
    let rb: u64 = 0xffff_ffff_8100_0000;
    let absolute_percpu = syms.iter().any(|s| s.3);
    // Tokens: every byte used stands for itself; unused ones get compounds.
    let mut used = [false; 256];
    for (name, kind, ..) in syms {
        used[*kind as usize] = true;
        for c in name.bytes() {
            used[usize::from(c)] = true;
        }
    }
    for d in b'0'..=b'9' {
        used[usize::from(d)] = true;
    }
    let mut tokens: Vec<Vec<u8>> = Vec::new();
    let mut compounds = COMPOUNDS.iter();
    for (b, &u) in used.iter().enumerate() {
        tokens.push(if u {
            vec![b as u8]
        } else if let Some(c) = compounds.next() {
            c.as_bytes().to_vec()
        } else {
            format!("~{b}").into_bytes()
        });
    }
    let encode_name = |s: &[u8]| -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            let (t, len) = (0..256usize)
                .filter(|&t| s[i..].starts_with(&tokens[t]) && (used[t] || tokens[t].len() > 1))
                .map(|t| (t, tokens[t].len()))
                .max_by_key(|&(_, l)| l)
                .expect("every byte has a token");
            out.push(t as u8);
            i += len;
        }
        out
    };
    let mut names = Vec::new();
    let mut markers = Vec::new();
    for (i, (name, kind, ..)) in syms.iter().enumerate() {
        if i % 256 == 0 {
            markers.push(names.len() as u32);
        }
        let mut full = vec![*kind as u8];
        full.extend_from_slice(name.as_bytes());
        let enc = encode_name(&full);
        if enc.len() > 127 {
            names.push(0x80 | (enc.len() & 0x7f) as u8);
            names.push((enc.len() >> 7) as u8);
        } else {
            names.push(enc.len() as u8);
        }
        names.extend_from_slice(&enc);
    }
    let offsets: Vec<u8> = syms
        .iter()
        .flat_map(|&(_, _, addr, abs)| {
            let o: u32 = if !absolute_percpu {
                (addr - rb) as u32
            } else if abs {
                addr as u32
            } else {
                (rb as i64 - addr as i64 - 1) as i32 as u32
            };
            o.to_le_bytes()
        })
        .collect();
    let mut out: Vec<u8> = (0..prefix).map(|i| (i * 7 + 3) as u8).collect();
    pad8(&mut out);
    let head = |out: &mut Vec<u8>| {
        out.extend_from_slice(&(syms.len() as u32).to_le_bytes());
        pad8(out);
        out.extend_from_slice(&names);
        pad8(out);
        for m in &markers {
            out.extend_from_slice(&m.to_le_bytes());
        }
        pad8(out);
        if seqs {
            for i in 0..syms.len() {
                out.extend_from_slice(&(i as u32).to_le_bytes()[..3]);
            }
            pad8(out);
        }
        let mut index = Vec::new();
        let start = out.len();
        for t in &tokens {
            index.extend_from_slice(&((out.len() - start) as u16).to_le_bytes());
            out.extend_from_slice(t);
            out.push(0);
        }
        pad8(out);
        out.extend_from_slice(&index);
    };
    let tail = |out: &mut Vec<u8>| {
        out.extend_from_slice(&offsets);
        pad8(out);
        out.extend_from_slice(&rb.to_le_bytes());
    };
    match layout {
        Layout::OffsetsFirst => {
            tail(&mut out);
            head(&mut out);
        }
        Layout::OffsetsLast => {
            head(&mut out);
            pad8(&mut out);
            tail(&mut out);
        }
    }
    out.extend_from_slice(&[0xee; 64]);
    out
}

/// `n` symbols: a few per-CPU ones, then text and data upward from the base.
pub(crate) fn sample(n: usize, percpu: bool) -> Vec<(String, char, u64, bool)> {
    let mut v: Vec<(String, char, u64, bool)> = Vec::new();
    if percpu {
        v.push(("fixed_percpu_data".into(), 'A', 0, true));
        v.push(("runqueues".into(), 'D', 0x2_f000, true));
    }
    v.push(("_text".into(), 'T', 0xffff_ffff_8100_0000, false));
    for i in 0..n {
        v.push((
            format!("init_task_fn_{i}"),
            't',
            0xffff_ffff_8100_1000 + i as u64 * 16,
            false,
        ));
    }
    v.push(("linux_banner".into(), 'D', 0xffff_ffff_8200_0000, false));
    v.push((
        // A long Rust-style name needs the two-byte length.
        format!("_R{}", "x9".repeat(100)),
        'T',
        0xffff_ffff_8200_0100,
        false,
    ));
    v
}

fn as_syms(v: &[(String, char, u64, bool)]) -> Vec<Sym<'_>> {
    v.iter()
        .map(|(n, k, a, b)| (n.as_str(), *k, *a, *b))
        .collect()
}

#[test]
fn both_layouts_decode_to_the_symbols_encoded() {
    for (layout, seqs) in [
        (Layout::OffsetsFirst, false),
        (Layout::OffsetsFirst, true),
        (Layout::OffsetsLast, false),
    ] {
        for percpu in [false, true] {
            for n in [0, 255, 256, 700] {
                let syms = sample(n, percpu);
                let region = encode_with(&as_syms(&syms), layout, 4096 + 13, seqs);
                let k = find(&region, 0xffff_ffff_8220_0000).unwrap_or_else(|e| {
                    panic!("{layout:?} seqs {seqs} percpu {percpu} n {n}: {e}")
                });
                assert_eq!(k.layout, layout);
                assert_eq!(k.absolute_percpu, percpu);
                assert_eq!(k.relative_base, 0xffff_ffff_8100_0000);
                assert_eq!(k.symbols.len(), syms.len());
                for (got, want) in k.symbols.iter().zip(&syms) {
                    assert_eq!(
                        (&got.name, got.kind, got.addr, got.absolute),
                        (&want.0, want.1, want.2, want.3)
                    );
                }
                assert_eq!(
                    k.get("linux_banner").map(|s| s.addr),
                    Some(0xffff_ffff_8200_0000)
                );
            }
        }
    }
}

#[test]
fn broken_tables_are_refused_with_what_was_found() {
    let syms = sample(600, true);
    let good = encode(&as_syms(&syms), Layout::OffsetsFirst, 64);
    assert!(find(&good, 0x1000).is_ok());
    assert_eq!(
        find(&good, 0x1004).unwrap_err(),
        KallsymsError::Unaligned(0x1004)
    );
    assert!(matches!(
        find(&[0u8; 4096], 0),
        Err(KallsymsError::NoTokenTable(4096))
    ));
    let digits = good
        .windows(DIGITS.len())
        .position(|w| w == DIGITS)
        .unwrap();
    // A marker off by one: the names no longer agree with the markers.
    let mut bad = good.clone();
    let m = digits - 64; // well inside the markers or names
    bad[m] ^= 0x01;
    let e = find(&bad, 0x1000);
    assert!(e.is_err() || e.as_ref().is_ok_and(|k| k.symbols.len() == syms.len()));
    // Unsorted offsets.
    let mut bad = good.clone();
    let off = 64 + 4 * 10; // a text symbol's offset made a small absolute address
    bad[off..off + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    assert!(matches!(
        find(&bad, 0x1000),
        Err(KallsymsError::NoOffsets(_))
    ));
    // Every truncation fails cleanly.
    for cut in (0..good.len()).step_by(97) {
        let _ = find(&good[..cut], 0x1000);
    }
}

#[test]
fn every_single_byte_flip_ends_in_an_answer_not_a_panic() {
    let syms = sample(300, false);
    let good = encode(&as_syms(&syms), Layout::OffsetsLast, 8);
    for at in (0..good.len()).step_by(61) {
        let mut bad = good.clone();
        bad[at] = bad[at].wrapping_add(0x41);
        let _ = find(&bad, 0);
    }
}
