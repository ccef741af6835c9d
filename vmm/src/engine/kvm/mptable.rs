//! An Intel MultiProcessor Specification 1.4 table, so a guest without ACPI finds every vCPU, the
//! I/O APIC and the ISA interrupt routing. It is written into the EBDA (just below 640 KiB), where
//! Linux's `find_smp_config` looks for the floating pointer.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::KvmError;
use crate::layout::EBDA_START;

/// Where the I/O APIC's registers live.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Where each local APIC's registers live.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Interrupt lines of the in-kernel I/O APIC that we describe.
const IRQ_LINES: u8 = 24;
const EBDA_END: u64 = 0xa0000;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the MP configuration table (header + entries) for `vcpus` processors, to live at `addr`.
fn config_table(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus; // the first ID after the processors'
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        entries.push(0); // processor entry
        entries.push(cpu); // local APIC ID
        entries.push(0x14); // local APIC version
        entries.push(if cpu == 0 { 0x3 } else { 0x1 }); // enabled (| bootstrap)
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus entry, bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]); // I/O APIC, version, enabled
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IRQ_LINES {
        // I/O interrupt: INT, conforming polarity/trigger, ISA bus 0 irq -> I/O APIC pin irq.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on every LINT0, NMI on every LINT1.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    // 20 bytes per vCPU: about 5 KiB for 255.
    let length = u16::try_from(44 + entries.len()).expect("an MP table is a few KiB");
    let mut table = Vec::with_capacity(length as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"BDVMM   ");
    table.extend_from_slice(b"BACKDOORS   ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Writes the floating pointer and the configuration table into the EBDA.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), KvmError> {
    let table_addr = EBDA_START + 16;
    let table = config_table(vcpus);
    if table_addr + table.len() as u64 > EBDA_END {
        return Err(KvmError::Boot(format!(
            "MP table for {vcpus} vCPUs does not fit in the EBDA"
        )));
    }
    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    let table_addr32 = u32::try_from(table_addr)
        .map_err(|_| KvmError::Boot(format!("MP table at {table_addr:#x}, above 4 GiB")))?;
    fp.extend_from_slice(&table_addr32.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // feature bytes: no default configuration
    fp[10] = checksum(&fp);
    let err = |e| KvmError::Boot(format!("cannot write the MP table: {e}"));
    mem.write_slice(&fp, GuestAddress(EBDA_START))
        .map_err(err)?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_checksum_to_zero_and_count_entries() {
        for vcpus in [1u8, 2, 32] {
            let t = config_table(vcpus);
            assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(count, u16::from(vcpus) + 2 + u16::from(IRQ_LINES) + 2);
            assert_eq!(u16::from_le_bytes([t[4], t[5]]) as usize, t.len());
        }
    }
}
