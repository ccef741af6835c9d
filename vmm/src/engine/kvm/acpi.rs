//! Minimal ACPI tables for the kvm engine: RSDP → XSDT → FADT (hardware-reduced, with a DSDT) and
//! MADT. Without them a kernel built without `CONFIG_X86_MPPARSE` — Debian's cloud kernel, for
//! one — finds no second CPU (the MP table is all it would have) and cannot power the machine off.
//!
//! * **MADT**: one enabled local APIC per vCPU, the I/O APIC (identity-mapped ISA IRQs, as the
//!   in-kernel irqchip routes them and as the MP table says).
//! * **FADT**: `HW_REDUCED_ACPI` (no PM timer, no SCI, no fixed hardware), no 8042, no VGA, no CMOS
//!   RTC (the kvm engine has none; Linux then skips probing them), and two I/O ports as the sleep
//!   control and status registers ([`SLEEP_CONTROL_PORT`], [`SLEEP_STATUS_PORT`]).
//! * **DSDT**: `\_S5` = {5, 0, 0, 0}, so Linux can enter S5 (it writes `SLP_TYP=5 | SLP_EN` to the
//!   sleep control register, which bdvmm turns into a clean power-off), and COM1 as a PnP device
//!   with its ports and IRQ 4 (a hardware-reduced platform has no legacy PIC, so without this the
//!   serial port's interrupt would reach no one).
//!
//! All tables sit in the BIOS area at [`RSDP_ADDR`] (where Linux also scans for an RSDP), and
//! bdvmm passes that address in `boot_params.acpi_rsdp_addr` / `hvm_start_info.rsdp_paddr`.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mptable::{IOAPIC_ADDR, LAPIC_ADDR};
use super::KvmError;

/// Where the RSDP goes (16-byte aligned, inside the 0xE0000–0xFFFFF range Linux scans).
pub const RSDP_ADDR: u64 = 0xe_0000;
/// End of the area the tables may use.
const TABLES_END: u64 = 0xf_0000;
/// The hardware-reduced sleep control register (one byte, write).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// The hardware-reduced sleep status register (one byte, read).
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// `SLP_EN` in the sleep control register.
pub const SLP_EN: u8 = 1 << 5;
/// The sleep type bits of the sleep control register.
pub const SLP_TYP_SHIFT: u8 = 2;
/// The sleep type value of S5 (soft off), as `\_S5` says.
pub const SLP_TYP_S5: u8 = 5;

const OEM_ID: &[u8; 6] = b"BDVMM ";
const OEM_TABLE_ID: &[u8; 8] = b"BACKDOOR";
const CREATOR_ID: &[u8; 4] = b"BDVM";

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A table with its standard 36-byte header; `body` follows it. The checksum is filled in.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = 36 + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    // Our largest table, the MADT for 255 vCPUs, is about 2 KiB.
    let len32 = u32::try_from(len).expect("an ACPI table is a few KiB");
    t.extend_from_slice(&len32.to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure for a one-byte I/O port.
fn gas_io_byte(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = 8; // register bit width
    g[2] = 0; // bit offset
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// AML for `Device (COM1)` in `\_SB`: `_HID` PNP0501 (a 16550), `_UID` 0, and `_CRS` with its
/// eight ports at 0x3F8 and IRQ 4 (edge, active high). A hardware-reduced platform has no legacy
/// PIC, so Linux maps no ISA IRQ by itself: the serial port's interrupt reaches the guest only
/// once ACPI PnP has described it (and the 8250 PnP driver has taken the port over).
fn com1_aml() -> Vec<u8> {
    let crs: &[u8] = &[
        0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, // IO (Decode16, 0x3F8, 0x3F8, 1, 8)
        0x22, 0x10, 0x00, // IRQNoFlags () {4}
        0x79, 0x00, // end tag
    ];
    let mut body = Vec::new();
    body.extend_from_slice(&[0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01]); // EisaId("PNP0501")
    body.extend_from_slice(&[0x08, b'_', b'U', b'I', b'D', 0x00]); // Zero
    body.extend_from_slice(&[0x08, b'_', b'C', b'R', b'S', 0x11]); // Buffer
    body.push(pkg_len_1(1 + 2 + crs.len()));
    let crs_len = u8::try_from(crs.len()).expect("a 13-byte resource template");
    body.extend_from_slice(&[0x0a, crs_len]);
    body.extend_from_slice(crs);
    let mut device = vec![0x5b, 0x82, pkg_len_1(1 + 4 + body.len())]; // DeviceOp
    device.extend_from_slice(b"COM1");
    device.extend_from_slice(&body);
    let mut scope = vec![0x10, pkg_len_1(1 + 4 + device.len())]; // ScopeOp
    scope.extend_from_slice(b"_SB_");
    scope.extend_from_slice(&device);
    scope
}

/// A one-byte AML PkgLength (lengths below 64, which is all these tables need).
fn pkg_len_1(len: usize) -> u8 {
    match u8::try_from(len) {
        Ok(n) if n < 64 => n,
        _ => panic!("AML package of {len} bytes needs a longer PkgLength"),
    }
}

/// The DSDT: `Name (_S5, Package (4) {5, 0, 0, 0})`, COM1 and `devices` (AML definition
/// blocks for the virtio-mmio devices, from `devices::bus::MmioBus::acpi_aml`).
fn dsdt(devices: &[u8]) -> Vec<u8> {
    let mut aml = vec![
        0x08, b'_', b'S', b'5', b'_', // NameOp "_S5_"
        0x12, 0x07, 0x04, // PackageOp, PkgLength 7, 4 elements
        0x0a, SLP_TYP_S5, // BytePrefix 5
        0x00, 0x00, 0x00, // Zero, Zero, Zero
    ];
    aml.extend_from_slice(&com1_aml());
    aml.extend_from_slice(devices);
    table(b"DSDT", 2, &aml)
}

/// The FADT (revision 6, 276 bytes).
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    const HW_REDUCED_ACPI: u32 = 1 << 20;
    const PWR_BUTTON: u32 = 1 << 4; // no fixed power button
    const SLP_BUTTON: u32 = 1 << 5; // no fixed sleep button
    const VGA_NOT_PRESENT: u16 = 1 << 2;
    const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
    let mut b = vec![0u8; 276 - 36];
    let at = |off: usize| off - 36;
    // The 32-bit DSDT pointer; 0 (X_DSDT only) if the DSDT were ever above 4 GiB.
    let dsdt32 = u32::try_from(dsdt_addr).unwrap_or(0);
    b[at(40)..at(44)].copy_from_slice(&dsdt32.to_le_bytes());
    b[at(109)..at(111)].copy_from_slice(&(VGA_NOT_PRESENT | CMOS_RTC_NOT_PRESENT).to_le_bytes());
    b[at(112)..at(116)].copy_from_slice(&(HW_REDUCED_ACPI | PWR_BUTTON | SLP_BUTTON).to_le_bytes());
    b[at(131)] = 4; // FADT minor version (6.4)
    b[at(140)..at(148)].copy_from_slice(&dsdt_addr.to_le_bytes()); // X_DSDT
    b[at(244)..at(256)].copy_from_slice(&gas_io_byte(SLEEP_CONTROL_PORT));
    b[at(256)..at(268)].copy_from_slice(&gas_io_byte(SLEEP_STATUS_PORT));
    b[at(268)..at(276)].copy_from_slice(b"BDVMMKVM"); // hypervisor vendor identity
    table(b"FACP", 6, &b)
}

/// The MADT for `vcpus` processors; the I/O APIC takes the first ID after theirs.
fn madt(vcpus: u8) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    let mut b = Vec::new();
    b.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&PCAT_COMPAT.to_le_bytes());
    for cpu in 0..vcpus {
        // Processor local APIC: type 0, length 8, ACPI processor UID, APIC ID, flags (enabled).
        b.extend_from_slice(&[0, 8, cpu, cpu]);
        b.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, ID, reserved, address, global system interrupt base.
    b.extend_from_slice(&[1, 12, vcpus, 0]);
    b.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    table(b"APIC", 5, &b)
}

/// The XSDT listing `entries`.
fn xsdt(entries: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    table(b"XSDT", 1, &body)
}

/// The RSDP (revision 2) pointing at the XSDT.
fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes, below
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.push(0); // extended checksum, below
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// Every table and where it goes, RSDP first.
fn layout(vcpus: u8, devices: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let align = |a: u64| (a + 15) & !15;
    let dsdt_addr = align(RSDP_ADDR + 36);
    let dsdt = dsdt(devices);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let xsdt = xsdt(&[fadt_addr, madt_addr]);
    vec![
        (RSDP_ADDR, rsdp(xsdt_addr)),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (xsdt_addr, xsdt),
    ]
}

/// Writes the tables for `vcpus` processors and the virtio-mmio `devices` (AML); returns the
/// RSDP's address.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8, devices: &[u8]) -> Result<u64, KvmError> {
    for (addr, bytes) in layout(vcpus, devices) {
        if addr + bytes.len() as u64 > TABLES_END {
            return Err(KvmError::Boot(format!(
                "ACPI tables for {vcpus} vCPUs do not fit below {TABLES_END:#x}"
            )));
        }
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|e| KvmError::Boot(format!("cannot write the ACPI tables: {e}")))?;
    }
    Ok(RSDP_ADDR)
}

/// The sleep state a write of `value` to the sleep control register asks for, if it asks for one
/// (`SLP_EN` set).
pub fn sleep_request(value: u8) -> Option<u8> {
    (value & SLP_EN != 0).then_some((value >> SLP_TYP_SHIFT) & 0x7)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    struct Nothing;
    impl crate::devices::bus::MmioDevice for Nothing {
        fn read(&self, _: u64, _: &mut [u8]) {}
        fn write(&mut self, _: u64, _: &[u8]) {}
    }

    /// The AML of a bus holding as many devices as it can.
    fn full_bus_aml() -> Vec<u8> {
        let mut bus = crate::devices::bus::MmioBus::new();
        while bus
            .add(std::sync::Arc::new(std::sync::Mutex::new(Nothing)))
            .is_ok()
        {}
        bus.acpi_aml().unwrap()
    }

    #[test]
    fn every_table_checksums_to_zero_and_points_at_the_next() {
        let full = full_bus_aml();
        for (vcpus, devices) in [(1u8, &[][..]), (2, &full[..]), (32, &full[..])] {
            let tables = layout(vcpus, devices);
            let find = |sig: &[u8]| {
                tables
                    .iter()
                    .find(|(_, t)| &t[..sig.len()] == sig)
                    .unwrap_or_else(|| panic!("no {sig:?}"))
            };
            let (_, r) = find(b"RSD PTR ");
            assert_eq!(sum(&r[..20]), 0);
            assert_eq!(sum(r), 0);
            let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
            let (xa, x) = find(b"XSDT");
            assert_eq!(*xa, xsdt_addr);
            for (a, t) in &tables[1..] {
                assert_eq!(sum(t), 0, "table at {a:#x}");
                assert_eq!(
                    u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                    t.len()
                );
                assert!(a + t.len() as u64 <= TABLES_END);
            }
            let entries: Vec<u64> = x[36..]
                .chunks(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let (fa, f) = find(b"FACP");
            let (ma, m) = find(b"APIC");
            assert_eq!(entries, vec![*fa, *ma]);
            assert_eq!(f.len(), 276);
            let (da, _) = find(b"DSDT");
            assert_eq!(u64::from_le_bytes(f[140..148].try_into().unwrap()), *da);
            // One local APIC entry per vCPU, then the I/O APIC.
            assert_eq!(m.len(), 44 + 8 * usize::from(vcpus) + 12);
        }
    }

    #[test]
    fn only_a_write_with_slp_en_is_a_sleep_request() {
        assert_eq!(sleep_request((5 << 2) | SLP_EN), Some(5));
        assert_eq!(sleep_request(5 << 2), None);
        assert_eq!(sleep_request(SLP_EN), Some(0));
    }
}
