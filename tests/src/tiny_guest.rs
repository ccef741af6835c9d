//! A tiny guest for the kvm engine: an ELF with a PVH note whose 32-bit entry prints a line on
//! COM1 and then increments a counter in memory forever. It needs no kernel, so it runs on hosts
//! whose KVM cannot finish a Linux boot, and it makes "is the guest really stopped?" measurable.

/// Guest-physical address of the 32-bit counter the tiny guest increments.
pub const COUNTER_GPA: u64 = 0x20_0000;
/// What it prints first.
pub const BANNER: &str = "TINY GUEST READY";
/// Where it is loaded and entered.
const LOAD_GPA: u64 = 0x10_0000;
const CODE_OFFSET: u64 = 0x1000;

/// The machine code (32-bit protected mode, flat segments, as PVH enters).
fn code() -> Vec<u8> {
    let mut c = vec![0xba, 0xf8, 0x03, 0x00, 0x00]; // mov edx, 0x3f8
    for b in BANNER.bytes().chain(*b"\n") {
        c.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    c.extend_from_slice(&[0xff, 0x05]); // inc dword [COUNTER_GPA]
    c.extend_from_slice(&u32::try_from(COUNTER_GPA).unwrap().to_le_bytes());
    c.extend_from_slice(&[0xeb, 0xf8]); // jmp back to the inc (-8)
    c
}

/// The whole ELF image.
pub fn elf() -> Vec<u8> {
    let code = code();
    let phoff = 64u64;
    let note_off = phoff + 2 * 56;
    // Note: namesz 4 ("Xen\0"), descsz 4, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), desc = entry.
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&18u32.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&u32::try_from(LOAD_GPA).unwrap().to_le_bytes());

    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD_GPA.to_le_bytes()); // e_entry
    f.extend_from_slice(&phoff.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes()); // no sections
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&64u16.to_le_bytes());
    f.extend_from_slice(&56u16.to_le_bytes());
    f.extend_from_slice(&2u16.to_le_bytes());
    f.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    let phdr =
        |f: &mut Vec<u8>, ty: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
            f.extend_from_slice(&ty.to_le_bytes());
            f.extend_from_slice(&flags.to_le_bytes());
            f.extend_from_slice(&off.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&align.to_le_bytes());
        };
    phdr(
        &mut f,
        1,
        5,
        CODE_OFFSET,
        LOAD_GPA,
        code.len() as u64,
        0x1000,
    );
    phdr(&mut f, 4, 4, note_off, 0, note.len() as u64, 4);
    f.extend_from_slice(&note);
    f.resize(usize::try_from(CODE_OFFSET).unwrap(), 0);
    f.extend_from_slice(&code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_has_the_pvh_note_and_code_where_the_headers_say() {
        let f = elf();
        assert_eq!(&f[..4], b"\x7fELF");
        let note_off = 64 + 2 * 56;
        assert_eq!(&f[note_off + 12..note_off + 16], b"Xen\0");
        assert_eq!(f[usize::try_from(CODE_OFFSET).unwrap()], 0xba);
        assert_eq!(&f[f.len() - 2..], &[0xeb, 0xf8]);
    }
}
