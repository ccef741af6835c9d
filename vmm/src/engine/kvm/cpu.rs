//! Initial vCPU state for the two boot protocols bdvmm supports (Linux 64-bit and PVH), following
//! the x86 boot protocol (Documentation/x86/boot.rst), the PVH ABI and Firecracker's choices.
//!
//! | protocol | mode at entry | paging | registers |
//! |---|---|---|---|
//! | Linux 64-bit (bzImage, vmlinux without PVH note) | long mode, CPL 0 | identity map of the first 1 GiB (2 MiB pages) | RIP = entry, RSI = zero page |
//! | PVH (vmlinux with XEN_ELFNOTE_PHYS32_ENTRY) | 32-bit protected mode, flat segments | off | EIP = PVH entry, EBX = hvm_start_info |

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::KvmError;

/// Where the GDT lives (guest-physical).
pub const GDT_START: u64 = 0x500;
/// Where the (empty) IDT lives.
pub const IDT_START: u64 = 0x520;
/// Boot stack top for the 64-bit protocol.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page-map level 4 of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot identity map.
pub const PDE_START: u64 = 0xb000;

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// The MSR holding the kernel's per-CPU GS base while the CPU runs user code.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// How the guest is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol: long mode, RSI points at the zero page.
    Linux64 {
        /// Entry point (startup_64).
        entry: u64,
        /// The zero page (struct boot_params).
        zero_page: u64,
    },
    /// PVH: 32-bit protected mode, EBX points at `hvm_start_info`.
    Pvh {
        /// The XEN_ELFNOTE_PHYS32_ENTRY address.
        entry: u64,
        /// The `hvm_start_info` structure.
        start_info: u64,
    },
}

/// Packs a GDT entry from its flags (access byte in bits 0..8, granularity nibble in 12..16), base
/// and limit, as the hardware expects it.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The `kvm_segment` that a GDT entry at `index` describes.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit =
        u32::try_from(((entry >> 32) & 0x000f_0000) | (entry & 0xffff)).expect("masked to 20 bits");
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), KvmError> {
    for (i, entry) in gdt.iter().enumerate() {
        let addr = GuestAddress(GDT_START)
            .checked_add(i as u64 * 8)
            .ok_or(KvmError::Boot("GDT address overflow".into()))?;
        mem.write_obj(*entry, addr)
            .map_err(|e| KvmError::Boot(format!("cannot write GDT: {e}")))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|e| KvmError::Boot(format!("cannot write IDT: {e}")))
}

/// Identity-maps the first GiB with 2 MiB pages for the 64-bit entry. Every entry of the three
/// tables is written: on a restart in place these pages hold what the previous guest kept there
/// (low memory is ordinary RAM to it), and a stale entry past the first would map whatever it
/// pointed to for the new kernel's early code.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), KvmError> {
    let err =
        |e: vm_memory::GuestMemoryError| KvmError::Boot(format!("cannot write page tables: {e}"));
    for table in [PML4_START, PDPTE_START] {
        mem.write_slice(&[0u8; 4096], GuestAddress(table))
            .map_err(err)?;
    }
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(err)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(err)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(err)?;
    }
    Ok(())
}

/// Sets segments, control registers and (for Linux64) paging for `entry`.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd, entry: BootEntry) -> Result<(), KvmError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(KvmError::Vcpu)?;
    let gdt: [u64; 4] = match entry {
        BootEntry::Linux64 { .. } => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS
        ],
        BootEntry::Pvh { .. } => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit flat code
            gdt_entry(0xc093, 0, 0xfffff), // 32-bit flat data
            gdt_entry(0x008b, 0, 0x67),    // TSS
        ],
    };
    write_gdt(mem, &gdt)?;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(&gdt) - 1).expect("a 4-entry GDT");
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match entry {
        BootEntry::Linux64 { .. } => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootEntry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(KvmError::Vcpu)
}

/// General-purpose registers at entry.
pub fn setup_regs(vcpu: &VcpuFd, entry: BootEntry) -> Result<(), KvmError> {
    let regs = match entry {
        BootEntry::Linux64 { entry, zero_page } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rsi: zero_page,
            ..Default::default()
        },
        BootEntry::Pvh { entry, start_info } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: start_info,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs).map_err(KvmError::Vcpu)
}

/// x87/SSE control words as after reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), KvmError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(KvmError::Vcpu)
}

/// The MSRs a booting kernel expects in a known state.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), KvmError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ];
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| KvmError::Boot(format!("cannot build MSR list: {e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(KvmError::Vcpu)?;
    if set != entries.len() {
        return Err(KvmError::Boot(format!(
            "KVM accepted only {set} of {} boot MSRs",
            entries.len()
        )));
    }
    Ok(())
}

/// Reads the kernel GS base MSR (the per-CPU base while user code runs).
pub fn read_kernel_gs_base(vcpu: &VcpuFd) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_KERNEL_GS_BASE,
        ..Default::default()
    }])
    .ok()?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    // The registers are `c_char`s: take each one's bits as a byte.
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes(std::array::from_fn(|i| b[i].to_ne_bytes()[0]))
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = std::ffi::c_char::from_ne_bytes([*byte]);
    }
}

/// LINT0 delivers the PIC's ExtINT and LINT1 NMIs, as the MP spec's virtual-wire mode wants.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), KvmError> {
    let mut state = vcpu.get_lapic().map_err(KvmError::Vcpu)?;
    let lvt0 = lapic_reg(&state, APIC_LVT0);
    set_lapic_reg(
        &mut state,
        APIC_LVT0,
        (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let lvt1 = lapic_reg(&state, APIC_LVT1);
    set_lapic_reg(
        &mut state,
        APIC_LVT1,
        (lvt1 & !0x700) | (APIC_MODE_NMI << 8),
    );
    vcpu.set_lapic(&state).map_err(KvmError::Vcpu)
}

/// The supported CPUID, adjusted per vCPU: its APIC ID, the vCPU count and the hypervisor bit.
pub fn setup_cpuid(
    vcpu: &VcpuFd,
    supported: &CpuId,
    id: u8,
    count: u8,
    tsc_deadline: bool,
) -> Result<(), KvmError> {
    let mut cpuid = supported.clone();
    let shift = u32::BITS - u32::from(count.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(count) << 16) | (u32::from(id) << 24);
                e.ecx |= 1 << 31; // running under a hypervisor
                if tsc_deadline {
                    e.ecx |= 1 << 24;
                }
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor
                }
            }
            0xb | 0x1f => {
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(KvmError::Vcpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_into_segments() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.selector, 8);
        assert_eq!(code.type_, 0xb);
        assert_eq!(
            (code.l, code.db, code.g, code.present, code.s),
            (1, 0, 1, 1, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let data32 = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data32.l, data32.db, data32.type_), (0, 1, 3));
        let tss = segment_from_gdt(gdt_entry(0x008b, 0x1234_5678, 0x67), 3);
        assert_eq!(tss.base, 0x1234_5678);
        assert_eq!(tss.limit, 0x67);
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }
}
