//! The pieces the kvm engine needs to put virtio-mmio devices in a guest, short of the engine
//! itself: where each device lives ([`MmioBus`]), how the guest learns of it (its
//! `virtio_mmio.device=` command-line entries), how it interrupts ([`EventFdInterrupt`], for an
//! irqfd) and how the user names a disk ([`DiskSpec`], the `--disk PATH[,ro]` value).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::mmio::{Interrupt, MmioTransport, Notifier, VirtioDevice, MMIO_WINDOW};

/// Guest-physical address of the first device window: in the 32-bit hole above RAM (which ends
/// at 3 GiB at most), below the IOAPIC (0xfec0_0000) and LAPIC (0xfee0_0000).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// IOAPIC input of the first device; COM1 has 4. Inputs up to 23 exist.
pub const FIRST_IRQ: u32 = 5;
/// Most virtio-mmio devices one guest gets (IRQs 5..=23 minus 8, the RTC's, and 12, the PS/2
/// mouse's, which we keep clear of).
pub const MAX_DEVICES: usize = 17;

/// A device on the MMIO bus, as a vCPU's exit handler sees it.
pub trait MmioDevice: Send {
    /// A read of `data.len()` bytes at `offset` in the device's window.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A write at `offset` in the device's window.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// A machine reset: the device forgets what the driver set up, as after a write of 0 to its
    /// status, but keeps what it was built with (its image and lock).
    fn hard_reset(&mut self) {}
    /// The device's queue notification eventfds, to register as ioeventfds (see
    /// [`MmioTransport::notifiers`]).
    fn notifiers(&self) -> std::io::Result<Vec<Notifier>> {
        Ok(Vec::new())
    }
    /// A notification of queue `index` that arrived through its eventfd.
    fn notify(&mut self, _index: usize) {}
}

impl<D: VirtioDevice + Send> MmioDevice for MmioTransport<D> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }

    fn hard_reset(&mut self) {
        MmioTransport::hard_reset(self);
    }

    fn notifiers(&self) -> std::io::Result<Vec<Notifier>> {
        MmioTransport::notifiers(self)
    }

    fn notify(&mut self, index: usize) {
        MmioTransport::notify(self, index);
    }
}

/// Where one device sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Guest-physical base of its 4 KiB window.
    pub base: u64,
    /// Its IOAPIC input (the GSI its irqfd is registered on).
    pub irq: u32,
}

impl Slot {
    /// The kernel command-line entry that makes the guest's virtio-mmio driver probe it
    /// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
    pub fn cmdline_entry(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.irq)
    }
}

/// An AML PkgLength for a package whose contents (after the PkgLength) are `len` bytes: one byte
/// up to 63 in all, two up to 4095.
fn pkg_len(len: usize) -> Option<Vec<u8>> {
    if len + 1 < 64 {
        return Some(vec![u8::try_from(len + 1).ok()?]);
    }
    let total = len + 2;
    if total >= 1 << 12 {
        return None;
    }
    Some(vec![
        0x40 | u8::try_from(total & 0x0f).ok()?,
        u8::try_from(total >> 4).ok()?,
    ])
}

impl Slot {
    /// AML for the device in the DSDT, named `VMxx` (xx = `index` in hex): `_HID` "LNRO0005"
    /// (the ACPI id Linux's virtio_mmio driver matches), `_UID` index, and `_CRS` with its 4 KiB
    /// window (`Memory32Fixed`, read-write) and its interrupt (`Interrupt`, consumer, edge, active
    /// high, exclusive). None if the window is above 4 GiB or `index` exceeds 255.
    pub fn acpi_device_aml(&self, index: usize) -> Option<Vec<u8>> {
        let index = u8::try_from(index).ok()?;
        let base = u32::try_from(self.base).ok()?;
        let window = u32::try_from(MMIO_WINDOW).ok()?;
        let mut crs = vec![0x86, 0x09, 0x00, 0x01]; // Memory32Fixed, 9 bytes follow, ReadWrite
        crs.extend_from_slice(&base.to_le_bytes());
        crs.extend_from_slice(&window.to_le_bytes());
        // Extended Interrupt: 6 bytes follow; consumer | edge (active high, exclusive); 1 entry.
        crs.extend_from_slice(&[0x89, 0x06, 0x00, 0x03, 0x01]);
        crs.extend_from_slice(&self.irq.to_le_bytes());
        crs.extend_from_slice(&[0x79, 0x00]); // end tag
        let crs_len = u8::try_from(crs.len()).ok()?;

        let mut body = vec![0x08, b'_', b'H', b'I', b'D', 0x0d]; // Name (_HID, "LNRO0005")
        body.extend_from_slice(b"LNRO0005\0");
        body.extend_from_slice(&[0x08, b'_', b'U', b'I', b'D', 0x0a, index]); // Name (_UID, index)
        body.extend_from_slice(&[0x08, b'_', b'C', b'R', b'S', 0x11]); // Name (_CRS, Buffer)
        body.extend(pkg_len(2 + crs.len())?);
        body.extend_from_slice(&[0x0a, crs_len]);
        body.extend_from_slice(&crs);

        let name = format!("VM{index:02X}");
        let mut device = vec![0x5b, 0x82]; // DeviceOp
        device.extend(pkg_len(4 + body.len())?);
        device.extend_from_slice(name.as_bytes());
        device.extend_from_slice(&body);
        Some(device)
    }
}

/// Why a device could not be placed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// No free slot.
    #[error("too many virtio devices: at most {MAX_DEVICES}")]
    Full,
}

type Shared = Arc<Mutex<dyn MmioDevice>>;

/// The MMIO devices of one guest, shared by its vCPU threads.
#[derive(Default)]
pub struct MmioBus {
    devices: Vec<(Slot, Shared)>,
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// The slot the next device would get.
    pub fn next_slot(&self) -> Result<Slot, BusError> {
        let n = self.devices.len();
        if n >= MAX_DEVICES {
            return Err(BusError::Full);
        }
        // IRQs from FIRST_IRQ upwards, skipping 8 and 12.
        let irq = (FIRST_IRQ..24)
            .filter(|&i| i != 8 && i != 12)
            .nth(n)
            .ok_or(BusError::Full)?;
        let index = u64::try_from(n).map_err(|_| BusError::Full)?;
        Ok(Slot {
            base: MMIO_BASE + index * MMIO_WINDOW,
            irq,
        })
    }

    /// Places `device` in the next slot, which it returns.
    pub fn add(&mut self, device: Shared) -> Result<Slot, BusError> {
        let slot = self.next_slot()?;
        self.devices.push((slot, device));
        Ok(slot)
    }

    /// Every slot in use.
    pub fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        self.devices.iter().map(|(s, _)| *s)
    }

    /// The command-line entries of every device, space-separated.
    pub fn cmdline_params(&self) -> String {
        self.slots()
            .map(|s| s.cmdline_entry())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// AML for every device, in one `Scope (\_SB)`, to append to the DSDT's definition blocks
    /// (the way `engine::kvm::acpi` adds COM1); empty with no devices.
    pub fn acpi_aml(&self) -> Option<Vec<u8>> {
        if self.devices.is_empty() {
            return Some(Vec::new());
        }
        let mut devices = Vec::new();
        for (i, (slot, _)) in self.devices.iter().enumerate() {
            devices.extend(slot.acpi_device_aml(i)?);
        }
        let mut scope = vec![0x10]; // ScopeOp
        scope.extend(pkg_len(4 + devices.len())?);
        scope.extend_from_slice(b"_SB_");
        scope.extend_from_slice(&devices);
        Some(scope)
    }

    /// Resets every device (a machine reset; see [`MmioDevice::hard_reset`]).
    pub fn hard_reset(&self) {
        for (_, dev) in &self.devices {
            dev.lock().unwrap_or_else(|e| e.into_inner()).hard_reset();
        }
    }

    /// How many devices the bus holds.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether the bus holds no device.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, &Shared)> {
        let len = u64::try_from(len).ok()?;
        self.devices.iter().find_map(|(slot, dev)| {
            let offset = addr.checked_sub(slot.base)?;
            (offset.checked_add(len)? <= MMIO_WINDOW).then_some((offset, dev))
        })
    }

    /// A guest read at `addr`; false if no device claims it (the caller answers all-ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// A guest write at `addr`; false if no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// An [`Interrupt`] on an eventfd, to be registered as an irqfd on the device's GSI.
pub struct EventFdInterrupt(pub EventFd);

impl EventFdInterrupt {
    /// A new non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK)?))
    }
}

impl Interrupt for EventFdInterrupt {
    fn trigger(&self) {
        // Only fails when the counter would overflow, i.e. the guest has not taken 2^64 - 1
        // interrupts: it is pending anyway.
        let _ = self.0.write(1);
    }

    fn eventfd(&self) -> Option<&EventFd> {
        Some(&self.0)
    }
}

/// A `--disk` value: `PATH` or `PATH,ro`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// The raw image file.
    pub path: PathBuf,
    /// Whether the guest may only read it.
    pub read_only: bool,
}

/// Why a `--disk` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskSpecError {
    /// Nothing before the options.
    #[error("--disk needs a path: --disk PATH[,ro]")]
    NoPath,
    /// An option we do not know.
    #[error("--disk option {0:?} is not known: the only option is ro (--disk PATH[,ro])")]
    UnknownOption(String),
}

impl FromStr for DiskSpec {
    type Err = DiskSpecError;

    /// Splits at the last comma only if what follows looks like an option (`ro`, `rw`, a short
    /// word or a `key=value`), so paths with commas work
    /// (`--disk a,b.img` is the file `a,b.img`; `--disk a,b.img,ro` is it read-only).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((path, "ro")) => (path, true),
            Some((path, "rw")) => (path, false),
            Some((_, opt))
                if opt.contains('=') || (!opt.contains(['.', '/']) && opt.len() <= 8) =>
            {
                return Err(DiskSpecError::UnknownOption(opt.to_owned()))
            }
            _ => (s, false),
        };
        if path.is_empty() {
            return Err(DiskSpecError::NoPath);
        }
        Ok(Self {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

impl fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if self.read_only {
            write!(f, ",ro")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);

    impl MmioDevice for Echo {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset & 0xff).unwrap());
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn devices_get_consecutive_windows_and_irqs_clear_of_rtc_and_mouse() {
        let mut bus = MmioBus::new();
        let mut irqs = Vec::new();
        for i in 0..MAX_DEVICES {
            let slot = bus.add(Arc::new(Mutex::new(Echo(Vec::new())))).unwrap();
            assert_eq!(slot.base, MMIO_BASE + u64::try_from(i).unwrap() * 0x1000);
            irqs.push(slot.irq);
        }
        assert_eq!(irqs[0], 5);
        assert!(!irqs.contains(&8) && !irqs.contains(&12) && !irqs.contains(&4));
        assert!(irqs.iter().all(|&i| i < 24));
        assert_eq!(
            bus.add(Arc::new(Mutex::new(Echo(Vec::new())))),
            Err(BusError::Full)
        );
    }

    #[test]
    fn cmdline_names_every_device() {
        let mut bus = MmioBus::new();
        assert_eq!(bus.cmdline_params(), "");
        bus.add(Arc::new(Mutex::new(Echo(Vec::new())))).unwrap();
        bus.add(Arc::new(Mutex::new(Echo(Vec::new())))).unwrap();
        assert_eq!(
            bus.cmdline_params(),
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset_and_nothing_else() {
        let mut bus = MmioBus::new();
        let echo = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.add(echo.clone()).unwrap();
        let mut b = [0u8; 4];
        assert!(bus.read(MMIO_BASE + 0x70, &mut b));
        assert_eq!(b, [0x70; 4]);
        assert!(bus.write(MMIO_BASE + 0x50, &[1, 0, 0, 0]));
        assert_eq!(echo.lock().unwrap().0, vec![(0x50, vec![1, 0, 0, 0])]);
        // Outside every window, or straddling its end.
        assert!(!bus.read(MMIO_BASE - 4, &mut b));
        assert!(!bus.read(MMIO_BASE + 0xffe, &mut b));
        assert!(!bus.write(MMIO_BASE + 0x1000, &[0; 4]));
        assert!(!bus.read(u64::MAX - 1, &mut b));
    }

    /// Decodes a PkgLength at the start of `b`: (value, bytes it took).
    fn read_pkg_len(b: &[u8]) -> (usize, usize) {
        let extra = usize::from(b[0] >> 6);
        if extra == 0 {
            return (usize::from(b[0] & 0x3f), 1);
        }
        let mut v = usize::from(b[0] & 0x0f);
        for i in 0..extra {
            v |= usize::from(b[1 + i]) << (4 + 8 * i);
        }
        (v, 1 + extra)
    }

    #[test]
    fn pkg_lengths_count_themselves() {
        assert_eq!(pkg_len(10), Some(vec![11]));
        assert_eq!(pkg_len(62), Some(vec![63]));
        assert_eq!(read_pkg_len(&pkg_len(63).unwrap()), (65, 2));
        assert_eq!(read_pkg_len(&pkg_len(1000).unwrap()), (1002, 2));
        assert_eq!(pkg_len(5000), None);
    }

    #[test]
    fn acpi_describes_each_window_and_irq_for_the_virtio_mmio_driver() {
        let slot = Slot {
            base: 0xd000_1000,
            irq: 6,
        };
        let aml = slot.acpi_device_aml(1).unwrap();
        assert_eq!(&aml[..2], &[0x5b, 0x82]);
        let (len, n) = read_pkg_len(&aml[2..]);
        assert_eq!(2 + len, aml.len(), "the device package covers the rest");
        assert_eq!(&aml[2 + n..2 + n + 4], b"VM01");
        let find = |needle: &[u8]| aml.windows(needle.len()).position(|w| w == needle);
        assert!(find(b"_HID\x0dLNRO0005\0").is_some());
        assert!(find(&[b'_', b'U', b'I', b'D', 0x0a, 1]).is_some());
        let mem = find(&[0x86, 0x09, 0x00, 0x01]).unwrap();
        assert_eq!(&aml[mem + 4..mem + 8], &0xd000_1000u32.to_le_bytes());
        assert_eq!(&aml[mem + 8..mem + 12], &0x1000u32.to_le_bytes());
        assert_eq!(&aml[mem + 12..mem + 21], &[0x89, 6, 0, 3, 1, 6, 0, 0, 0]);
        assert_eq!(
            &aml[aml.len() - 2..],
            &[0x79, 0x00],
            "the buffer ends the device"
        );
        // The buffer's declared size matches the resource template.
        let crs = find(b"_CRS\x11").unwrap() + 5;
        let (buf_len, m) = read_pkg_len(&aml[crs..]);
        assert_eq!(crs + buf_len, aml.len());
        assert_eq!(aml[crs + m], 0x0a);
        assert_eq!(usize::from(aml[crs + m + 1]), aml.len() - (crs + m + 2));
        // Windows above 4 GiB cannot be Memory32Fixed.
        let high = Slot {
            base: 1 << 32,
            irq: 5,
        };
        assert_eq!(high.acpi_device_aml(0), None);
    }

    #[test]
    fn the_acpi_scope_holds_every_device() {
        let mut bus = MmioBus::new();
        assert_eq!(bus.acpi_aml(), Some(Vec::new()));
        for _ in 0..MAX_DEVICES {
            bus.add(Arc::new(Mutex::new(Echo(Vec::new())))).unwrap();
        }
        let aml = bus.acpi_aml().unwrap();
        assert_eq!(aml[0], 0x10);
        let (len, n) = read_pkg_len(&aml[1..]);
        assert_eq!(1 + len, aml.len());
        assert_eq!(&aml[1 + n..1 + n + 4], b"_SB_");
        let devices = aml.windows(2).filter(|w| w == &[0x5b, 0x82]).count();
        assert_eq!(devices, MAX_DEVICES);
        assert!(aml.windows(4).any(|w| w == b"VM10"));
    }

    #[test]
    fn eventfd_interrupt_counts() {
        let irq = EventFdInterrupt::new().unwrap();
        irq.trigger();
        irq.trigger();
        assert_eq!(irq.0.read().unwrap(), 2);
    }

    #[test]
    fn disk_specs_parse() {
        let d: DiskSpec = "/img/root.img".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/img/root.img"));
        assert!(!d.read_only);
        let d: DiskSpec = "root.img,ro".parse().unwrap();
        assert!(d.read_only);
        assert_eq!(d.to_string(), "root.img,ro");
        let d: DiskSpec = "a,b.img".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("a,b.img"));
        let d: DiskSpec = "a,b.img,ro".parse().unwrap();
        assert_eq!((d.path.to_str().unwrap(), d.read_only), ("a,b.img", true));
        assert_eq!("".parse::<DiskSpec>(), Err(DiskSpecError::NoPath));
        assert_eq!(",ro".parse::<DiskSpec>(), Err(DiskSpecError::NoPath));
        assert_eq!(
            "x.img,readonly".parse::<DiskSpec>(),
            Err(DiskSpecError::UnknownOption("readonly".into()))
        );
        assert_eq!(
            "x.img,cache=none".parse::<DiskSpec>(),
            Err(DiskSpecError::UnknownOption("cache=none".into()))
        );
    }
}
