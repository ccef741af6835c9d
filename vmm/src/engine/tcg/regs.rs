//! Parses QEMU's `info registers` text (x86) into [`VcpuRegs`].

use crate::engine::VcpuRegs;

/// The hex number right after `key` (at a word start), e.g. `CR3=000000000260a000`.
fn hex_after(text: &str, key: &str) -> Option<u64> {
    let mut from = 0;
    while let Some(i) = text[from..].find(key) {
        let at = from + i;
        let word_start = text[..at].chars().last().is_none_or(|c| c.is_whitespace());
        let after = &text[at + key.len()..];
        if word_start {
            let end = after
                .find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(after.len());
            if end > 0 {
                return u64::from_str_radix(&after[..end], 16).ok();
            }
        }
        from = at + key.len();
    }
    None
}

/// The base of a segment line such as `GS =0000 ffff88801fc00000 ffffffff 00c00000`.
fn segment_base(text: &str, seg: &str) -> Option<u64> {
    let prefix = format!("{seg} =");
    let line = text.lines().find(|l| l.trim_start().starts_with(&prefix))?;
    let base = line.split_whitespace().nth(2)?;
    u64::from_str_radix(base, 16).ok()
}

/// The section of `info registers -a` output for `cpu`, or the whole text if it has no headers.
fn cpu_section(text: &str, cpu: u8) -> Option<&str> {
    let header = format!("CPU#{cpu}");
    let mut from = 0;
    while let Some(i) = text[from..].find(&header) {
        let start = from + i + header.len();
        // "CPU#1" must not match "CPU#10".
        if !text[start..].starts_with(|c: char| c.is_ascii_digit()) {
            let body = &text[start..];
            return Some(match body.find("CPU#") {
                Some(end) => &body[..end],
                None => body,
            });
        }
        from = start;
    }
    (cpu == 0 && !text.contains("CPU#")).then_some(text)
}

/// Parses one vCPU's registers; `None` if the text does not hold them.
pub fn parse(text: &str, cpu: u8) -> Option<VcpuRegs> {
    let s = cpu_section(text, cpu)?;
    Some(VcpuRegs {
        rip: hex_after(s, "RIP=")?,
        rsp: hex_after(s, "RSP=")?,
        rflags: hex_after(s, "RFL=")?,
        cr0: hex_after(s, "CR0=")?,
        cr2: hex_after(s, "CR2=")?,
        cr3: hex_after(s, "CR3=")?,
        cr4: hex_after(s, "CR4=")?,
        efer: hex_after(s, "EFER=")?,
        cpl: u8::try_from(hex_after(s, "CPL=")?).ok()?,
        fs_base: segment_base(s, "FS")?,
        gs_base: segment_base(s, "GS")?,
        kernel_gs_base: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        [
            "",
            "CPU#0",
            "RAX=0000000000000000 RBX=0000000000000000 RCX=0000000000000001 RDX=0000000000000000",
            "RSI=0000000000000083 RDI=0000000000000000 RBP=ffffffff82603e38 RSP=ffffffff82603e20",
            "R8 =0000000000000000 R9 =0000000000000000 R10=0000000000000000 R11=0000000000000000",
            "RIP=ffffffff81e5e82b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1",
            "ES =0000 0000000000000000 ffffffff 00c00000",
            "CS =0010 0000000000000000 ffffffff 00a09b00 DPL=0 CS64 [-RA]",
            "FS =0000 0000000000000000 ffffffff 00c00000",
            "GS =0000 ffff88801f400000 ffffffff 00c00000",
            "CR0=80050033 CR2=0000000000d4a000 CR3=000000000260a000 CR4=000006f0",
            "EFER=0000000000000d01",
            "CPU#1",
            "RIP=0000000000000001 RSP=2 RFL=3 CPL=3",
            "FS =0000 0000000000000010 ffffffff 00c00000",
            "GS =0000 0000000000000020 ffffffff 00c00000",
            "CR0=1 CR2=2 CR3=3 CR4=4",
            "EFER=5",
        ]
        .join("\r\n")
    }

    #[test]
    fn parses_each_cpu_section() {
        let text = sample();
        let r = parse(&text, 0).unwrap();
        assert_eq!(r.rip, 0xffffffff81e5e82b);
        assert_eq!(r.rsp, 0xffffffff82603e20);
        assert_eq!(r.cr3, 0x260a000);
        assert_eq!(r.gs_base, 0xffff88801f400000);
        assert_eq!(r.efer, 0xd01);
        assert_eq!(r.cpl, 0);
        let r1 = parse(&text, 1).unwrap();
        assert_eq!((r1.rip, r1.cr3, r1.gs_base, r1.cpl), (1, 3, 0x20, 3));
        assert!(parse(&text, 2).is_none());
        assert!(parse("garbage", 0).is_none());
    }
}
