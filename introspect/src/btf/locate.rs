//! Finding the kernel's BTF blob in a copy of its read-only data, for a kernel whose symbol table
//! does not name `__start_BTF`: the first place that starts like a BTF header (magic, version 1,
//! no flags, a 24-byte or longer header, the type section first) and parses as a whole.
//!
//! Bounded: at most [`MAX_CANDIDATES`] places are parsed, each only within the region. The fuzz
//! target `btf_locate` drives [`find`].

use super::{Btf, MAGIC, VERSION};
use crate::le::u32_at;

/// Places that look like a header and are parsed before giving up.
pub const MAX_CANDIDATES: usize = 16;

/// The blob's bounds in `region` (start, length) and its parsed types.
pub fn find(region: &[u8]) -> Option<(usize, usize, Btf)> {
    let magic = MAGIC.to_le_bytes();
    let head = [magic[0], magic[1], VERSION, 0];
    region
        .windows(4)
        .enumerate()
        // The kernel's .BTF section is 4-byte aligned.
        .filter(|(at, w)| at % 4 == 0 && *w == head)
        .take(MAX_CANDIDATES)
        .find_map(|(at, _)| {
            let field = |off| u32_at(region, at + off).and_then(|v| usize::try_from(v).ok());
            let (hdr_len, type_off, type_len) = (field(4)?, field(8)?, field(12)?);
            let (str_off, str_len) = (field(16)?, field(20)?);
            if !(24..=256).contains(&hdr_len) || type_off != 0 {
                return None;
            }
            let len = hdr_len
                .checked_add(type_len.max(str_off.checked_add(str_len)?))?
                .max(hdr_len.checked_add(type_len)?);
            let blob = region.get(at..at.checked_add(len)?)?;
            Btf::parse(blob).ok().map(|btf| (at, len, btf))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btf::encoder::sample;

    #[test]
    fn a_blob_is_found_after_junk_and_broken_lookalikes_are_skipped() {
        let blob = sample();
        let mut region = vec![0x55u8; 100];
        // A look-alike header with a section past the end.
        region.extend_from_slice(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0]);
        region.extend_from_slice(&[0u8; 12]);
        let at = region.len();
        region.extend_from_slice(&blob);
        region.extend_from_slice(&[0xaa; 33]);
        let (start, len, btf) = find(&region).expect("found");
        assert_eq!((start, len), (at, blob.len()));
        assert_eq!(btf.type_count(), Btf::parse(&blob).unwrap().type_count());
        assert!(find(&region[..at + blob.len() - 1]).is_none());
        assert!(find(&[]).is_none());
    }
}
