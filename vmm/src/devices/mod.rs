//! Paravirtual devices of the kvm engine: the virtio-mmio transport ([`mmio`]) and the devices
//! behind it ([`block`]; [`net`], served by vhost-net on a host tap from [`tap`]).
//!
//! Everything here is tested at the seam: a guest memory and a virtqueue laid out by the test,
//! MMIO register accesses and requests in, bytes on the image and used-ring entries out. Nothing
//! in this module touches KVM; the engine decides how accesses and interrupts get here.
//!
//! # How the kvm engine wires them
//!
//! 1. **Placement** ([`bus::MmioBus::add`]): a 4 KiB window ([`mmio::MMIO_WINDOW`]) per device
//!    from [`bus::MMIO_BASE`] (0xd000_0000) up, in the 32-bit hole above RAM (which ends at 3 GiB
//!    at most, see [`crate::layout`]), clear of the IOAPIC and LAPIC; an IOAPIC input from 5 up,
//!    skipping 8 (RTC) and 12 (PS/2 mouse); COM1 has 4. The MP table lists all 24 pins.
//! 2. **Discovery**: the DSDT ([`bus::MmioBus::acpi_aml`], appended by `engine::kvm::acpi`):
//!    one `Device` per window, `_HID` "LNRO0005" (the ACPI id of Linux's virtio_mmio driver),
//!    `_CRS` with the window and an edge-triggered interrupt. The kvm engine's ACPI is
//!    hardware-reduced, and there Linux wires no ISA IRQ by itself; a DSDT entry is what makes it
//!    wire the pin, as for COM1, so no `virtio_mmio.device=` command-line entry is needed
//!    ([`bus::MmioBus::cmdline_params`] stays for kernels without ACPI).
//! 3. **MMIO exits**: `engine::kvm::vcpu::handle_exit` hands every MMIO access to the bus (the
//!    `mmio` field of `engine::kvm::devices::PioBus`); unclaimed reads are all-ones. Each device
//!    is behind a `Mutex`, and a block request runs on the vCPU thread that wrote QueueNotify.
//! 4. **Interrupts**: each transport has an [`bus::EventFdInterrupt`] registered with
//!    `VmFd::register_irqfd` on its slot's GSI on every VM build. An irqfd pulses the pin, hence
//!    the edge-triggered description.
//! 5. **Reset**: a guest reset rebuilds the KVM VM on the same memfd; the devices survive
//!    ([`bus::MmioBus::hard_reset`] makes them forget queues and features, the image and its lock
//!    stay) and their irqfds are registered on the new VM.
//! 6. **Notifications**: a block device's QueueNotify is an MMIO exit whose write runs the
//!    request on the vCPU thread. A net device's notifiers ([`mmio::Notifier`] from
//!    [`bus::MmioDevice::notifiers`], `serve` false) are registered with
//!    `VmFd::register_ioevent(&n.fd, &IoEventAddress::Mmio(slot.base +
//!    mmio::QUEUE_NOTIFY_OFFSET), n.queue)` on every VM build, and the kernel's vhost-net consumes
//!    them (it is handed the same fds as its kick fds): a guest kick never leaves the kernel.
//!    vhost-net signals the device's irqfd eventfd directly as its call fd (see [`net`]).
//! 7. **Set-up** ([`setup::MmioDevices::build`]): every image is opened and locked, every tap
//!    attached and `/dev/vhost-net` opened before the guest starts, so a bad `--disk` or `--net`
//!    is one line at start-up.

pub mod block;
pub mod bus;
pub mod mmio;
pub mod net;
pub mod setup;
pub mod tap;

#[cfg(test)]
mod tests;
