//! The port-I/O devices of the kvm engine: COM1 (vm-superio 16550A, IRQ 4 through an irqfd), the
//! i8042 controller, whose CPU-reset command is how a guest reboots (as in Firecracker), and the
//! ACPI hardware-reduced sleep registers, through which a guest powers off (S5; see `acpi.rs`).
//! Every other port reads as all-ones (no device) and ignores writes.

use std::sync::Mutex;

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::acpi::{sleep_request, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT, SLP_TYP_S5};
use crate::console::ConsoleWriter;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;

/// An EventFd that vm-superio devices can trigger.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    /// A new non-blocking trigger.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK)?))
    }
}

/// The I/O buses, shared by all vCPU threads: port I/O (below) and the virtio-mmio devices.
pub struct PioBus {
    /// The virtio-mmio devices (disks); an MMIO access no device claims reads as all-ones.
    pub mmio: crate::devices::bus::MmioBus,
    /// COM1.
    pub serial: Mutex<Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleWriter>>,
    /// The i8042; its trigger fires when the guest asks for a CPU reset.
    pub i8042: Mutex<I8042Device<EventFdTrigger>>,
    /// Fires when the guest enters S5 through the ACPI sleep control register.
    pub poweroff: EventFdTrigger,
}

impl PioBus {
    /// Handles a guest `in`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) && data.len() == 1 => {
                data[0] = lock(&self.serial).read(register(p, COM1_BASE));
            }
            I8042_DATA | I8042_COMMAND if data.len() == 1 => {
                data[0] = lock(&self.i8042).read(register(port, I8042_DATA));
            }
            SLEEP_STATUS_PORT if data.len() == 1 => data[0] = 0,
            _ => {}
        }
    }

    /// Handles a guest `out`.
    pub fn write(&self, port: u16, data: &[u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) && data.len() == 1 => {
                if let Err(e) = lock(&self.serial).write(register(p, COM1_BASE), data[0]) {
                    tracing::warn!("serial write failed: {e:?}");
                }
            }
            I8042_DATA | I8042_COMMAND if data.len() == 1 => {
                if let Err(e) = lock(&self.i8042).write(register(port, I8042_DATA), data[0]) {
                    tracing::warn!("i8042 write failed: {e}");
                }
            }
            SLEEP_CONTROL_PORT if data.len() == 1 => match sleep_request(data[0]) {
                Some(SLP_TYP_S5) => {
                    if let Err(e) = self.poweroff.trigger() {
                        tracing::error!("cannot signal the guest's power-off: {e}");
                    }
                }
                Some(other) => tracing::debug!("guest asked for sleep type {other}; ignored"),
                None => {}
            },
            _ => {}
        }
    }
}

/// The register that `port` selects in a device whose ports start at `base`. The callers' match
/// arms keep `port - base` below 8, so the low byte is all of it.
fn register(port: u16, base: u16) -> u8 {
    (port - base).to_le_bytes()[0]
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::Console;

    #[test]
    fn reset_and_s5_fire_their_triggers_and_unknown_ports_float_high() {
        let console = Console::new(false, None).unwrap();
        let bus = PioBus {
            mmio: crate::devices::bus::MmioBus::new(),
            serial: Mutex::new(Serial::new(
                EventFdTrigger::new().unwrap(),
                ConsoleWriter(console),
            )),
            i8042: Mutex::new(I8042Device::new(EventFdTrigger::new().unwrap())),
            poweroff: EventFdTrigger::new().unwrap(),
        };
        let mut b = [0u8; 1];
        bus.read(0x2f8, &mut b);
        assert_eq!(b[0], 0xff);
        bus.write(I8042_COMMAND, &[0xfe]);
        assert_eq!(bus.i8042.lock().unwrap().reset_evt().0.read().unwrap(), 1);
        // S3 is ignored; S5 with SLP_EN powers off.
        bus.write(SLEEP_CONTROL_PORT, &[(3 << 2) | super::super::acpi::SLP_EN]);
        assert!(bus.poweroff.0.read().is_err(), "nothing pending");
        bus.write(SLEEP_CONTROL_PORT, &[(5 << 2) | super::super::acpi::SLP_EN]);
        assert_eq!(bus.poweroff.0.read().unwrap(), 1);
    }
}
