//! Guest-physical memory layout shared by both engines.
//!
//! Guest RAM is one memfd. Its first `low` bytes are mapped at guest-physical 0; whatever does not
//! fit below [`LOW_RAM_MAX`] is mapped at 4 GiB (above the PCI/MMIO hole), exactly as QEMU's `pc`
//! machine does with `max-ram-below-4g=3G`. The MiB at [`BACKDOOR_GPA`] (15 MiB) is the
//! **backdoor range**: still ordinary guest RAM backed by the memfd, but marked reserved in the e820
//! map (and with `memmap=` on the command line) so the guest's allocators never use it. The patched
//! guest kernel places its Sensor Box there (`backdoor.sb=<gpa>,<size>`).
//!
//! Why 15 MiB: firmware puts its ACPI tables at the top of RAM (SeaBIOS under the tcg engine) and
//! boot loaders put the initrd there, the uncompressed kernel starts at 16 MiB
//! (`CONFIG_PHYSICAL_START`; KASLR avoids `memmap=` ranges), and a compressed kernel loaded at
//! 1 MiB is far smaller than 14 MiB. The MiB below 16 MiB is the one place no one else claims.

pub use bdvmm_api::{GpaRange, RamRange};

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;
/// RAM above this guest-physical address is placed at [`HIGH_RAM_START`] instead.
pub const LOW_RAM_MAX: u64 = 3 * GIB;
/// Where RAM resumes above the 32-bit MMIO hole.
pub const HIGH_RAM_START: u64 = 4 * GIB;
/// Guest-physical start of the reserved backdoor range.
pub const BACKDOOR_GPA: u64 = 15 * MIB;
/// Size of the reserved backdoor range.
pub const BACKDOOR_SIZE: u64 = MIB;
/// Smallest guest we accept: a 6.1 kernel with an initramfs needs some room.
pub const MIN_MEM_MIB: u64 = 64;
/// Largest guest we accept, whatever the host has.
pub const MAX_MEM_MIB: u64 = 256 * 1024;
/// Most vCPUs we will start.
pub const MAX_VCPUS: u8 = 32;

/// Start of the legacy VGA/BIOS hole in the first MiB (EBDA begins just below it).
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel and everything above it may live.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// e820 entry types we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram,
    /// Reserved (firmware, the backdoor range).
    Reserved,
}

impl E820Kind {
    /// The numeric type of the e820 and PVH memory-map ABIs.
    pub fn code(self) -> u32 {
        match self {
            E820Kind::Ram => 1,
            E820Kind::Reserved => 2,
        }
    }
}

/// The complete layout of one guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Total guest RAM (memfd size).
    pub total: u64,
    /// RAM ranges in guest-physical order.
    pub ranges: Vec<RamRange>,
    /// The reserved backdoor range (inside the first RAM range).
    pub backdoor: GpaRange,
}

/// Why a layout could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Memory size outside what we support.
    #[error("--mem {0} MiB is out of range: give between {MIN_MEM_MIB} MiB and {MAX_MEM_MIB} MiB")]
    MemOutOfRange(u64),
}

impl MemoryLayout {
    /// Lays out `mem_mib` MiB of guest RAM.
    pub fn new(mem_mib: u64) -> Result<Self, LayoutError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) {
            return Err(LayoutError::MemOutOfRange(mem_mib));
        }
        let total = mem_mib * MIB;
        let low = total.min(LOW_RAM_MAX);
        let mut ranges = vec![RamRange {
            gpa: 0,
            size: low,
            offset: 0,
        }];
        if total > low {
            ranges.push(RamRange {
                gpa: HIGH_RAM_START,
                size: total - low,
                offset: low,
            });
        }
        Ok(Self {
            total,
            ranges,
            backdoor: GpaRange {
                gpa: BACKDOOR_GPA,
                size: BACKDOOR_SIZE,
            },
        })
    }

    /// End (exclusive) of RAM below 4 GiB.
    pub fn low_end(&self) -> u64 {
        self.ranges[0].size
    }

    /// Translates a guest-physical range to a memfd offset, if it lies wholly inside RAM.
    pub fn gpa_to_offset(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len)?;
        self.ranges
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)
            .map(|r| r.offset + (gpa - r.gpa))
    }

    /// The e820 map the guest sees: low RAM (minus the EBDA), the backdoor reserved, high RAM.
    pub fn e820(&self) -> Vec<(u64, u64, E820Kind)> {
        let mut map = vec![
            (0, EBDA_START, E820Kind::Ram),
            (
                HIGH_MEMORY_START,
                self.backdoor.gpa - HIGH_MEMORY_START,
                E820Kind::Ram,
            ),
            (self.backdoor.gpa, self.backdoor.size, E820Kind::Reserved),
            (
                self.backdoor.gpa + self.backdoor.size,
                self.low_end() - (self.backdoor.gpa + self.backdoor.size),
                E820Kind::Ram,
            ),
        ];
        if let Some(high) = self.ranges.get(1) {
            map.push((high.gpa, high.size, E820Kind::Ram));
        }
        map
    }

    /// Kernel command-line parameters that name the backdoor range. Both engines append them, so
    /// the guest sees the same reserved range whether or not the firmware's e820 knows about it.
    pub fn cmdline_params(&self) -> String {
        format!(
            "memmap={:#x}${:#x} backdoor.sb={:#x},{:#x}",
            self.backdoor.size, self.backdoor.gpa, self.backdoor.gpa, self.backdoor.size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range_with_backdoor_on_top() {
        let l = MemoryLayout::new(512).unwrap();
        assert_eq!(l.ranges.len(), 1);
        assert_eq!(l.backdoor.gpa, 15 * MIB);
        assert_eq!(l.gpa_to_offset(l.backdoor.gpa, 4096), Some(15 * MIB));
        let e820 = l.e820();
        assert_eq!(e820[2], (15 * MIB, MIB, E820Kind::Reserved));
        assert_eq!(e820[3], (16 * MIB, 496 * MIB, E820Kind::Ram));
        assert_eq!(l.gpa_to_offset(512 * MIB - 1, 2), None);
    }

    #[test]
    fn large_guest_splits_at_3g() {
        let l = MemoryLayout::new(4096).unwrap();
        assert_eq!(l.ranges.len(), 2);
        assert_eq!(l.ranges[1].gpa, HIGH_RAM_START);
        assert_eq!(l.ranges[1].offset, LOW_RAM_MAX);
        assert_eq!(
            l.gpa_to_offset(HIGH_RAM_START + 5, 1),
            Some(LOW_RAM_MAX + 5)
        );
        assert_eq!(l.gpa_to_offset(LOW_RAM_MAX, 1), None);
        assert_eq!(l.backdoor.gpa, BACKDOOR_GPA);
    }

    #[test]
    fn absurd_sizes_are_refused() {
        assert!(MemoryLayout::new(0).is_err());
        assert!(MemoryLayout::new(MAX_MEM_MIB + 1).is_err());
    }
}
