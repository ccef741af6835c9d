//! A minimal ELF64 little-endian reader: find a section by name, look a symbol up in `.symtab`.
//!
//! Just enough to take the `.BTF` section and a few symbols out of a kernel's `vmlinux`. The file
//! is untrusted input: every offset, size and count in it is checked against the file's length
//! before use, nothing here panics, and nothing allocates in proportion to a value read from the
//! file. Both entry points are total functions over arbitrary bytes, so they can be fuzzed.

use crate::le::{u16_at as read_u16, u32_at as read_u32, u64_at as read_u64};

/// `\x7fELF`.
const MAGIC: &[u8; 4] = b"\x7fELF";
/// `e_ident[EI_CLASS]` for 64-bit files.
const CLASS64: u8 = 2;
/// `e_ident[EI_DATA]` for little-endian files.
const DATA_LSB: u8 = 1;
/// Size of the ELF64 file header.
const EHDR_SIZE: usize = 64;
/// Size of one ELF64 section header.
const SHDR_SIZE: usize = 64;
/// Size of one ELF64 symbol.
const SYM_SIZE: usize = 24;
/// `sh_type` of a section that occupies no file space (`.bss`).
const SHT_NOBITS: u32 = 8;
/// `e_shstrndx` value meaning "the real index is in section 0's `sh_link`".
const SHN_XINDEX: u16 = 0xffff;
/// `st_shndx` of an undefined symbol.
const SHN_UNDEF: u16 = 0;
/// `STB_GLOBAL` and `STB_WEAK` symbol bindings.
const STB_GLOBAL: u8 = 1;
const STB_WEAK: u8 = 2;

/// Why an ELF file could not be read.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// Not an ELF file at all.
    #[error("not an ELF file (first bytes {0:02x?}); expected an uncompressed vmlinux, not a bzImage/vmlinuz")]
    NotElf(Vec<u8>),
    /// An ELF file of a class or byte order this reader does not handle.
    #[error("unsupported ELF file: {0} (only 64-bit little-endian ELF is read)")]
    Unsupported(String),
    /// A structure that does not fit in the file.
    #[error("malformed ELF: {what} at {offset:#x}+{len:#x} lies outside the {file_len:#x}-byte file (truncated?)")]
    OutOfBounds {
        /// What was being read.
        what: &'static str,
        /// Its file offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// A header field with an impossible value.
    #[error("malformed ELF: {0}")]
    Malformed(String),
    /// No section of that name.
    #[error("the ELF file has no section named {0:?}")]
    NoSection(String),
    /// The section exists but has no bytes in the file (`SHT_NOBITS`).
    #[error("ELF section {0:?} occupies no space in the file (SHT_NOBITS)")]
    NoData(String),
    /// The file has no symbol table (it was stripped).
    #[error("the ELF file has no .symtab (it is stripped); take symbols from System.map instead")]
    NoSymtab,
}

/// One section header, as read from the file (not yet checked against the file's length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionHeader {
    /// Offset of the name in the section-header string table.
    pub name_off: u32,
    /// `sh_type`.
    pub sh_type: u32,
    /// `sh_flags`.
    pub flags: u64,
    /// Virtual address when loaded.
    pub addr: u64,
    /// Offset of the contents in the file.
    pub offset: u64,
    /// Size of the contents.
    pub size: u64,
    /// `sh_link` (for `.symtab`: the index of its string table).
    pub link: u32,
    /// `sh_info`.
    pub info: u32,
    /// Size of one entry, for tables.
    pub entsize: u64,
}

/// A parsed ELF64 little-endian file: the header checked, the section-header table located.
#[derive(Clone, Copy, Debug)]
pub struct Elf<'a> {
    bytes: &'a [u8],
    shoff: usize,
    shnum: usize,
    shstrtab: &'a [u8],
}

/// Finds section `name` in the ELF file `bytes` and returns its contents.
pub fn section<'a>(bytes: &'a [u8], name: &str) -> Result<&'a [u8], ElfError> {
    Elf::parse(bytes)?.section(name)
}

/// Looks `name` up in the `.symtab` of the ELF file `bytes` and returns its value (address).
///
/// `Ok(None)` means the symbol table exists but has no defined symbol of that name;
/// [`ElfError::NoSymtab`] means the file is stripped.
pub fn symbol(bytes: &[u8], name: &str) -> Result<Option<u64>, ElfError> {
    Elf::parse(bytes)?.symbol(name)
}

/// The NUL-terminated string at `off` in `table`, without its NUL; `None` if out of range or
/// unterminated.
fn c_str(table: &[u8], off: usize) -> Option<&[u8]> {
    let rest = table.get(off..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    rest.get(..end)
}

impl<'a> Elf<'a> {
    /// Checks the ELF header of `bytes` and locates its section-header table.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ElfError> {
        if bytes.len() < 4 || &bytes[..4] != MAGIC {
            return Err(ElfError::NotElf(bytes.iter().take(4).copied().collect()));
        }
        let oob = |what, offset: u64, len: u64| ElfError::OutOfBounds {
            what,
            offset,
            len,
            file_len: bytes.len() as u64,
        };
        if bytes.len() < EHDR_SIZE {
            return Err(oob("ELF header", 0, EHDR_SIZE as u64));
        }
        if bytes[4] != CLASS64 {
            return Err(ElfError::Unsupported(format!("EI_CLASS is {}", bytes[4])));
        }
        if bytes[5] != DATA_LSB {
            return Err(ElfError::Unsupported(format!("EI_DATA is {}", bytes[5])));
        }
        // The header is 64 bytes long and present, so these reads cannot fail.
        let field16 = |off| read_u16(bytes, off).unwrap_or(0);
        let shoff = read_u64(bytes, 40).unwrap_or(0);
        let shentsize = field16(58);
        let mut shnum = u64::from(field16(60));
        let shstrndx16 = field16(62);
        if shoff == 0 {
            return Err(ElfError::Malformed(
                "the file has no section-header table".into(),
            ));
        }
        if usize::from(shentsize) != SHDR_SIZE {
            return Err(ElfError::Malformed(format!(
                "section headers are {shentsize} bytes, expected {SHDR_SIZE}"
            )));
        }
        let table = |n: u64| -> Result<usize, ElfError> {
            let len = n
                .checked_mul(SHDR_SIZE as u64)
                .ok_or_else(|| oob("section-header table", shoff, u64::MAX))?;
            match shoff.checked_add(len) {
                Some(end) if end <= bytes.len() as u64 => {
                    usize::try_from(shoff).map_err(|_| oob("section-header table", shoff, len))
                }
                _ => Err(oob("section-header table", shoff, len)),
            }
        };
        let shoff_us = table(1)?;
        // Extended numbering: more than 0xff00 sections keep their count in section 0.
        let sh0 = |field: usize| read_u64(bytes, shoff_us + field).unwrap_or(0);
        if shnum == 0 {
            shnum = sh0(32);
        }
        let shnum_us = usize::try_from(shnum)
            .map_err(|_| ElfError::Malformed(format!("{shnum} section headers")))?;
        table(shnum)?;
        let shstrndx = if shstrndx16 == SHN_XINDEX {
            u64::from(read_u32(bytes, shoff_us + 40).unwrap_or(0))
        } else {
            u64::from(shstrndx16)
        };
        let mut elf = Elf {
            bytes,
            shoff: shoff_us,
            shnum: shnum_us,
            shstrtab: &[],
        };
        let strhdr = elf.section_header(shstrndx)?;
        elf.shstrtab = elf.contents(&strhdr, "section-header string table")?;
        Ok(elf)
    }

    /// Number of section headers.
    pub fn section_count(&self) -> usize {
        self.shnum
    }

    /// The section header at `index`.
    pub fn section_header(&self, index: u64) -> Result<SectionHeader, ElfError> {
        let index = usize::try_from(index)
            .ok()
            .filter(|i| *i < self.shnum)
            .ok_or_else(|| {
                ElfError::Malformed(format!(
                    "section index {index} is beyond the {} section headers",
                    self.shnum
                ))
            })?;
        // Cannot overflow: parse() checked shoff + shnum * 64 <= file length.
        let base = self.shoff + index * SHDR_SIZE;
        let h = self
            .bytes
            .get(base..base + SHDR_SIZE)
            .ok_or(ElfError::OutOfBounds {
                what: "section header",
                offset: base as u64,
                len: SHDR_SIZE as u64,
                file_len: self.bytes.len() as u64,
            })?;
        let u32_at = |o| read_u32(h, o).unwrap_or(0);
        let u64_at = |o| read_u64(h, o).unwrap_or(0);
        Ok(SectionHeader {
            name_off: u32_at(0),
            sh_type: u32_at(4),
            flags: u64_at(8),
            addr: u64_at(16),
            offset: u64_at(24),
            size: u64_at(32),
            link: u32_at(40),
            info: u32_at(44),
            entsize: u64_at(56),
        })
    }

    /// The name of a section (raw bytes from the section-header string table).
    pub fn section_name(&self, hdr: &SectionHeader) -> Result<&'a [u8], ElfError> {
        c_str(self.shstrtab, hdr.name_off as usize).ok_or_else(|| {
            ElfError::Malformed(format!(
                "section name offset {:#x} is outside the {}-byte section-header string table",
                hdr.name_off,
                self.shstrtab.len()
            ))
        })
    }

    /// The bytes of a section, checked against the file.
    pub fn contents(&self, hdr: &SectionHeader, what: &'static str) -> Result<&'a [u8], ElfError> {
        let oob = ElfError::OutOfBounds {
            what,
            offset: hdr.offset,
            len: hdr.size,
            file_len: self.bytes.len() as u64,
        };
        let end = hdr.offset.checked_add(hdr.size).ok_or(oob.clone())?;
        if end > self.bytes.len() as u64 {
            return Err(oob);
        }
        // Both bounds are <= the file length, which fits in usize.
        let (Ok(start), Ok(end)) = (usize::try_from(hdr.offset), usize::try_from(end)) else {
            return Err(oob);
        };
        self.bytes.get(start..end).ok_or(oob)
    }

    /// Finds the section called `name`: its index and header.
    pub fn find_section(&self, name: &str) -> Result<Option<(u64, SectionHeader)>, ElfError> {
        for i in 0..self.shnum as u64 {
            let hdr = self.section_header(i)?;
            // A bad name offset in some other section need not stop the search.
            if c_str(self.shstrtab, hdr.name_off as usize) == Some(name.as_bytes()) {
                return Ok(Some((i, hdr)));
            }
        }
        Ok(None)
    }

    /// The contents of the section called `name`.
    pub fn section(&self, name: &str) -> Result<&'a [u8], ElfError> {
        let (_, hdr) = self
            .find_section(name)?
            .ok_or_else(|| ElfError::NoSection(name.to_owned()))?;
        if hdr.sh_type == SHT_NOBITS {
            return Err(ElfError::NoData(name.to_owned()));
        }
        self.contents(&hdr, "section contents")
    }

    /// Looks `name` up in `.symtab`: the value of a defined global (or weak) symbol of that name,
    /// else of the first defined local one, else `None`.
    pub fn symbol(&self, name: &str) -> Result<Option<u64>, ElfError> {
        let (_, symhdr) = self.find_section(".symtab")?.ok_or(ElfError::NoSymtab)?;
        if symhdr.entsize != SYM_SIZE as u64 {
            return Err(ElfError::Malformed(format!(
                ".symtab entries are {} bytes, expected {SYM_SIZE}",
                symhdr.entsize
            )));
        }
        let syms = self.contents(&symhdr, ".symtab")?;
        let strhdr = self.section_header(u64::from(symhdr.link))?;
        let strtab = self.contents(&strhdr, ".symtab string table")?;
        let mut local = None;
        for sym in syms.chunks_exact(SYM_SIZE) {
            let st_name = read_u32(sym, 0).unwrap_or(0) as usize;
            if c_str(strtab, st_name) != Some(name.as_bytes()) {
                continue;
            }
            let bind = sym[4] >> 4;
            let shndx = read_u16(sym, 6).unwrap_or(SHN_UNDEF);
            let value = read_u64(sym, 8).unwrap_or(0);
            if shndx == SHN_UNDEF {
                continue;
            }
            if bind == STB_GLOBAL || bind == STB_WEAK {
                return Ok(Some(value));
            }
            local.get_or_insert(value);
        }
        Ok(local)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a small ELF64 LE file with the given sections (name, type, contents, link,
    /// entsize); a `.shstrtab` is appended and section 0 is the null section.
    pub(crate) fn build(sections: &[(&str, u32, &[u8], u32, u64)]) -> Vec<u8> {
        let mut shstr = vec![0u8];
        let mut names = Vec::new();
        for (n, ..) in sections.iter() {
            names.push(u32::try_from(shstr.len()).unwrap());
            shstr.extend_from_slice(n.as_bytes());
            shstr.push(0);
        }
        let shstr_name = u32::try_from(shstr.len()).unwrap();
        shstr.extend_from_slice(b".shstrtab\0");

        let mut out = vec![0u8; EHDR_SIZE];
        let mut placed = Vec::new();
        for (_, _, data, _, _) in sections.iter() {
            placed.push(out.len() as u64);
            out.extend_from_slice(data);
        }
        let shstr_off = out.len() as u64;
        out.extend_from_slice(&shstr);
        while out.len() % 8 != 0 {
            out.push(0);
        }
        let shoff = out.len() as u64;
        let mut shdr = |name: u32, ty: u32, off: u64, size: u64, link: u32, entsize: u64| {
            let mut h = [0u8; SHDR_SIZE];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&ty.to_le_bytes());
            h[24..32].copy_from_slice(&off.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            h[40..44].copy_from_slice(&link.to_le_bytes());
            h[56..64].copy_from_slice(&entsize.to_le_bytes());
            out.extend_from_slice(&h);
        };
        shdr(0, 0, 0, 0, 0, 0);
        for (i, (_, ty, data, link, entsize)) in sections.iter().enumerate() {
            shdr(names[i], *ty, placed[i], data.len() as u64, *link, *entsize);
        }
        shdr(shstr_name, 3, shstr_off, shstr.len() as u64, 0, 0);
        let shnum = u16::try_from(sections.len()).unwrap() + 2;
        out[0..4].copy_from_slice(MAGIC);
        out[4] = CLASS64;
        out[5] = DATA_LSB;
        out[6] = 1;
        out[16..18].copy_from_slice(&2u16.to_le_bytes());
        out[18..20].copy_from_slice(&62u16.to_le_bytes());
        out[40..48].copy_from_slice(&shoff.to_le_bytes());
        out[52..54].copy_from_slice(&u16::try_from(EHDR_SIZE).unwrap().to_le_bytes());
        out[58..60].copy_from_slice(&u16::try_from(SHDR_SIZE).unwrap().to_le_bytes());
        out[60..62].copy_from_slice(&shnum.to_le_bytes());
        out[62..64].copy_from_slice(&(shnum - 1).to_le_bytes());
        out
    }

    fn sym(name: u32, bind: u8, shndx: u16, value: u64) -> [u8; SYM_SIZE] {
        let mut s = [0u8; SYM_SIZE];
        s[0..4].copy_from_slice(&name.to_le_bytes());
        s[4] = bind << 4;
        s[6..8].copy_from_slice(&shndx.to_le_bytes());
        s[8..16].copy_from_slice(&value.to_le_bytes());
        s
    }

    fn sample() -> Vec<u8> {
        let strtab = b"\0init_task\0local_fn\0undef\0".to_vec();
        let mut syms = Vec::new();
        syms.extend_from_slice(&[0u8; SYM_SIZE]);
        syms.extend_from_slice(&sym(11, 0, 1, 0x1000)); // local_fn, local
        syms.extend_from_slice(&sym(1, 0, 1, 0x2000)); // init_task, local
        syms.extend_from_slice(&sym(1, STB_GLOBAL, 1, 0x3000)); // init_task, global
        syms.extend_from_slice(&sym(20, STB_GLOBAL, SHN_UNDEF, 0x4000)); // undefined
        build(&[
            (".text", 1, b"\x90\x90\x90\x90", 0, 0),
            (".bss", SHT_NOBITS, b"", 0, 0),
            (".symtab", 2, &syms, 4, SYM_SIZE as u64),
            (".strtab", 3, &strtab, 0, 0),
        ])
    }

    #[test]
    fn finds_sections_and_symbols() {
        let f = sample();
        assert_eq!(section(&f, ".text").unwrap(), b"\x90\x90\x90\x90");
        assert_eq!(section(&f, ".BTF"), Err(ElfError::NoSection(".BTF".into())));
        assert_eq!(section(&f, ".bss"), Err(ElfError::NoData(".bss".into())));
        assert_eq!(
            symbol(&f, "init_task").unwrap(),
            Some(0x3000),
            "global wins"
        );
        assert_eq!(symbol(&f, "local_fn").unwrap(), Some(0x1000));
        assert_eq!(
            symbol(&f, "undef").unwrap(),
            None,
            "undefined symbols are skipped"
        );
        assert_eq!(symbol(&f, "nothing").unwrap(), None);
        let elf = Elf::parse(&f).unwrap();
        assert_eq!(elf.section_count(), 6);
    }

    #[test]
    fn stripped_file_has_no_symtab() {
        let f = build(&[(".BTF", 1, b"abc", 0, 0)]);
        assert_eq!(section(&f, ".BTF").unwrap(), b"abc");
        assert_eq!(symbol(&f, "x"), Err(ElfError::NoSymtab));
    }

    #[test]
    fn rejects_non_elf_and_other_classes() {
        assert!(matches!(section(b"", ".BTF"), Err(ElfError::NotElf(_))));
        assert!(matches!(
            section(b"MZ\0\0", ".BTF"),
            Err(ElfError::NotElf(_))
        ));
        assert!(matches!(
            section(b"\x7fELF", ".BTF"),
            Err(ElfError::OutOfBounds { .. })
        ));
        let mut f = sample();
        f[4] = 1;
        assert!(matches!(
            section(&f, ".text"),
            Err(ElfError::Unsupported(_))
        ));
        let mut f = sample();
        f[5] = 2;
        assert!(matches!(
            section(&f, ".text"),
            Err(ElfError::Unsupported(_))
        ));
    }

    #[test]
    fn rejects_out_of_bounds_tables() {
        let f = sample();
        // Section-header table past the end.
        let mut g = f.clone();
        g[40..48].copy_from_slice(&(f.len() as u64 - 10).to_le_bytes());
        assert!(matches!(
            section(&g, ".text"),
            Err(ElfError::OutOfBounds { .. })
        ));
        // Overflowing offset.
        let mut g = f.clone();
        g[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            section(&g, ".text"),
            Err(ElfError::OutOfBounds { .. })
        ));
        // Huge section count.
        let mut g = f.clone();
        g[60..62].copy_from_slice(&0xfff0u16.to_le_bytes());
        assert!(matches!(
            section(&g, ".text"),
            Err(ElfError::OutOfBounds { .. })
        ));
        // shstrndx beyond the table.
        let mut g = f.clone();
        g[62..64].copy_from_slice(&100u16.to_le_bytes());
        assert!(matches!(section(&g, ".text"), Err(ElfError::Malformed(_))));
        // A section whose contents run past the end.
        let shoff = usize::try_from(u64::from_le_bytes(f[40..48].try_into().unwrap())).unwrap();
        let mut g = f.clone();
        let text = shoff + SHDR_SIZE;
        g[text + 32..text + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            section(&g, ".text"),
            Err(ElfError::OutOfBounds { .. })
        ));
        // Symtab with a bogus entry size and a bogus string-table link.
        let mut g = f.clone();
        let symtab = shoff + 3 * SHDR_SIZE;
        g[symtab + 56..symtab + 64].copy_from_slice(&7u64.to_le_bytes());
        assert!(matches!(
            symbol(&g, "init_task"),
            Err(ElfError::Malformed(_))
        ));
        let mut g = f.clone();
        g[symtab + 40..symtab + 44].copy_from_slice(&999u32.to_le_bytes());
        assert!(matches!(
            symbol(&g, "init_task"),
            Err(ElfError::Malformed(_))
        ));
    }

    #[test]
    fn total_over_mutations() {
        let f = sample();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..5000 {
            let mut g = f.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = usize::try_from(next() % g.len() as u64).unwrap();
                g[i] = next().to_le_bytes()[0];
            }
            if next() % 4 == 0 {
                g.truncate(usize::try_from(next() % g.len() as u64).unwrap());
            }
            let _ = section(&g, ".text");
            let _ = section(&g, ".shstrtab");
            let _ = symbol(&g, "init_task");
        }
    }
}
