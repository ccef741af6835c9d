//! Puts a kernel, its initrd, its command line and the boot information into guest memory.
//!
//! Layout of the first MiB (guest-physical):
//!
//! | address | what |
//! |---|---|
//! | 0x500 | GDT (see `cpu.rs`) |
//! | 0x520 | IDT (empty) |
//! | 0x6000 | PVH `hvm_start_info`, then its module list at 0x6040 |
//! | 0x7000 | Linux zero page (`boot_params`) — or the PVH memory map |
//! | 0x8ff0 | boot stack top |
//! | 0x9000–0xbfff | boot page tables |
//! | 0x20000 | kernel command line |
//! | 0x9fc00 | MP table (EBDA) |
//! | 0xe0000 | ACPI tables: RSDP, DSDT, FADT, MADT, XSDT (see `acpi.rs`) |
//! | 0x100000 | kernel (bzImage protected-mode code, or vmlinux at its p_paddr) |
//!
//! The initrd goes at the top of low RAM. The backdoor range (15–16 MiB) is left alone.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::cpu::BootEntry;
use super::{acpi, mptable, KvmError};
use crate::bootfiles::KernelFormat;
use crate::layout::{MemoryLayout, HIGH_MEMORY_START};
use introspect::conv::usize_from;

/// The PVH start-info structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// The zero page, or the PVH memory map.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line x86 Linux accepts (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Offset of `startup_64` from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// What to boot (kept by the engine: a restart loads it again).
#[derive(Clone, Debug)]
pub struct BootSpec {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Its format (checked by `bootfiles`).
    pub format: KernelFormat,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// The full command line.
    pub cmdline: String,
    /// vCPU count (for the MP table).
    pub vcpus: u8,
    /// AML describing the virtio-mmio devices, appended to the DSDT (empty without devices).
    pub acpi_devices: Vec<u8>,
}

fn open(path: &Path, what: &str) -> Result<File, KvmError> {
    File::open(path)
        .map_err(|e| KvmError::Boot(format!("cannot open {what} {}: {e}", path.display())))
}

/// Loads everything and returns how to enter the kernel.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    spec: &BootSpec,
) -> Result<BootEntry, KvmError> {
    let mut kernel = open(&spec.kernel, "kernel")?;
    let loaded = match spec.format {
        KernelFormat::BzImage => BzImage::load(
            mem,
            None,
            &mut kernel,
            Some(GuestAddress(HIGH_MEMORY_START)),
        ),
        KernelFormat::Elf => Elf::load(
            mem,
            None,
            &mut kernel,
            Some(GuestAddress(HIGH_MEMORY_START)),
        ),
    }
    .map_err(|e| KvmError::Boot(format!("cannot load kernel {}: {e}", spec.kernel.display())))?;
    let backdoor_end = layout.backdoor.gpa + layout.backdoor.size;
    if loaded.kernel_load.0 < backdoor_end && loaded.kernel_end > layout.backdoor.gpa {
        return Err(KvmError::Boot(format!(
            "kernel {} ({:#x}-{:#x}) overlaps the backdoor range {:#x}-{backdoor_end:#x}",
            spec.kernel.display(),
            loaded.kernel_load.0,
            loaded.kernel_end,
            layout.backdoor.gpa
        )));
    }
    if loaded.kernel_end > layout.low_end() {
        return Err(KvmError::Boot(format!(
            "kernel {} ends at {:#x}, past low RAM ({:#x}); give the guest more --mem",
            spec.kernel.display(),
            loaded.kernel_end,
            layout.low_end()
        )));
    }

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| KvmError::Boot(e.to_string()))?;
    cmdline
        .insert_str(&spec.cmdline)
        .map_err(|e| KvmError::Boot(format!("bad kernel command line: {e}")))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| KvmError::Boot(format!("cannot write the command line: {e}")))?;
    mptable::write(mem, spec.vcpus)?;
    let rsdp = acpi::write(mem, spec.vcpus, &spec.acpi_devices)?;

    let initrd_max = loaded
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(u64::from(u32::MAX));
    let initrd = match spec.initrd.as_deref() {
        Some(path) => Some(load_initrd(
            mem,
            layout,
            path,
            loaded.kernel_end,
            initrd_max,
        )?),
        None => None,
    };

    match (spec.format, loaded.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_pvh_info(mem, layout, initrd, rsdp)?;
            Ok(BootEntry::Pvh {
                entry: entry.0,
                start_info: PVH_INFO_START,
            })
        }
        (format, _) => {
            // The zero page's address and size fields are 32 bits wide.
            let field32 = |what: &str, v: u64| {
                u32::try_from(v).map_err(|_| {
                    KvmError::Boot(format!(
                        "{what} {v:#x} does not fit the 32-bit boot protocol"
                    ))
                })
            };
            let mut params = boot_params::default();
            if let Some(hdr) = loaded.setup_header {
                params.hdr = hdr;
            }
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.cmd_line_ptr = field32("command line address", CMDLINE_START)?;
            params.acpi_rsdp_addr = rsdp;
            params.hdr.cmdline_size = field32("command line size", spec.cmdline.len() as u64 + 1)?;
            if params.hdr.kernel_alignment == 0 {
                params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            }
            if let Some((addr, size)) = initrd {
                params.hdr.ramdisk_image = field32("initrd address", addr)?;
                params.hdr.ramdisk_size = field32("initrd size", size)?;
            }
            let e820 = layout.e820();
            for (slot, (addr, size, kind)) in params.e820_table.iter_mut().zip(e820.iter()) {
                slot.addr = *addr;
                slot.size = *size;
                slot.r#type = kind.code();
            }
            let written = e820.len().min(params.e820_table.len());
            params.e820_entries = u8::try_from(written).map_err(|_| {
                KvmError::Boot(format!("{written} e820 entries do not fit the zero page"))
            })?;
            LinuxBootConfigurator::write_bootparams(
                &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
                mem,
            )
            .map_err(|e| KvmError::Boot(format!("cannot write the zero page: {e}")))?;
            let entry = match format {
                KernelFormat::BzImage => loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                KernelFormat::Elf => loaded.kernel_load.0,
            };
            Ok(BootEntry::Linux64 {
                entry,
                zero_page: ZERO_PAGE_START,
            })
        }
    }
}

/// Copies the initrd to the top of usable low RAM; returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    path: &Path,
    kernel_end: u64,
    initrd_max: u64,
) -> Result<(u64, u64), KvmError> {
    let mut file = open(path, "initrd")?;
    let size = file
        .metadata()
        .map_err(|e| KvmError::Boot(format!("cannot stat initrd {}: {e}", path.display())))?
        .len();
    let top = layout.low_end().min(initrd_max.saturating_add(1));
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(layout.backdoor.gpa + layout.backdoor.size))
        .ok_or_else(|| {
            KvmError::Boot(format!(
                "initrd {} ({} MiB) does not fit between the kernel and the top of low RAM; give the guest more --mem",
                path.display(),
                size >> 20
            ))
        })?;
    // size < the top of low RAM (checked above).
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, usize_from(size))
        .map_err(|e| KvmError::Boot(format!("cannot read initrd {}: {e}", path.display())))?;
    Ok((addr, size))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), KvmError> {
    let memmap: Vec<hvm_memmap_table_entry> = layout
        .e820()
        .iter()
        .map(|(addr, size, kind)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: kind.code(),
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: ZERO_PAGE_START,
        memmap_entries: u32::try_from(memmap.len())
            .map_err(|_| KvmError::Boot(format!("{} memory-map entries", memmap.len())))?,
        rsdp_paddr: rsdp,
        ..Default::default()
    };
    if initrd.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    if let Some((addr, size)) = initrd {
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: addr,
                size,
                ..Default::default()
            }],
            GuestAddress(PVH_MODLIST_START),
        );
    }
    params.set_sections(&memmap, GuestAddress(ZERO_PAGE_START));
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|e| KvmError::Boot(format!("cannot write PVH start info: {e}")))
}
