//! Building a guest's virtio-mmio devices from what the user asked for, before the engine starts:
//! every image is opened and locked and every tap attached (with `/dev/vhost-net` opened) here,
//! so a missing or busy disk or tap is one clear line at start-up rather than an I/O error or a
//! dead link inside the guest.

use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::block::{Block, BlockError};
use super::bus::{BusError, DiskSpec, EventFdInterrupt, MmioBus, Slot};
use super::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use super::net::{self, NetError};
use super::tap::{NetSpec, Tap, TapError};

/// Why the devices could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A disk image could not be opened or locked.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// More devices than the bus has slots.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// No eventfd for an interrupt.
    #[error("cannot make an interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    /// A network device could not be built (its tap or vhost-net).
    #[error(transparent)]
    Net(#[from] NetError),
    /// A tap could not be attached (tcg engine check).
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// A queue notification eventfd the kernel serves (vhost), to register as an ioeventfd:
/// `VmFd::register_ioevent(&fd, &IoEventAddress::Mmio(addr), queue)`.
pub struct IoEvent {
    /// Guest-physical address of the device's QueueNotify register.
    pub addr: u64,
    /// The queue index, the 4-byte datamatch.
    pub queue: u32,
    /// The eventfd (a duplicate of the transport's).
    pub fd: EventFd,
}

/// The virtio-mmio devices of one guest, with the eventfd each one interrupts through.
pub struct MmioDevices {
    /// The bus the vCPUs' MMIO exits go to.
    pub bus: MmioBus,
    /// Per device, in bus order: the eventfd its transport writes, to register as an irqfd on
    /// the slot's GSI.
    pub irqs: Vec<(Slot, EventFd)>,
    /// Notification eventfds that need no handler in bdvmm (vhost-net's kicks): register each as
    /// an ioeventfd on every VM built. Without the registration the guest's QueueNotify writes
    /// reach the transport as MMIO exits, which signal the same eventfds (slower, still works).
    pub ioevents: Vec<IoEvent>,
}

impl MmioDevices {
    /// The devices for `disks` then `nets`, on `mem` (a clone of the guest RAM mappings), in the
    /// order given: the first disk is `/dev/vda`, the first network device `eth0`.
    pub fn build(
        disks: &[DiskSpec],
        nets: &[NetSpec],
        mem: &GuestMemoryMmap,
    ) -> Result<Self, SetupError> {
        let mut bus = MmioBus::new();
        let mut irqs = Vec::with_capacity(disks.len() + nets.len());
        let mut ioevents = Vec::new();
        for disk in disks {
            let block = Block::open(&disk.path, disk.read_only)?;
            let interrupt = EventFdInterrupt::new().map_err(SetupError::EventFd)?;
            let irqfd = interrupt.0.try_clone().map_err(SetupError::EventFd)?;
            let transport = MmioTransport::new(block, mem.clone(), Arc::new(interrupt));
            let slot = bus.add(Arc::new(Mutex::new(transport)))?;
            tracing::info!(disk = %disk, base = slot.base, irq = slot.irq, "virtio-blk");
            irqs.push((slot, irqfd));
        }
        for spec in nets {
            let interrupt = Arc::new(EventFdInterrupt::new().map_err(SetupError::EventFd)?);
            let irqfd = interrupt.0.try_clone().map_err(SetupError::EventFd)?;
            let transport = net::build(spec, mem.clone(), interrupt)?;
            let notifiers = transport.notifiers().map_err(SetupError::EventFd)?;
            let slot = bus.add(Arc::new(Mutex::new(transport)))?;
            tracing::info!(net = %spec, base = slot.base, irq = slot.irq, "virtio-net (vhost-net)");
            ioevents.extend(notifiers.into_iter().filter(|n| !n.serve).map(|n| IoEvent {
                addr: slot.base + QUEUE_NOTIFY_OFFSET,
                queue: n.queue,
                fd: n.fd,
            }));
            irqs.push((slot, irqfd));
        }
        Ok(Self {
            bus,
            irqs,
            ioevents,
        })
    }
}

/// Checks that every disk can be opened and locked as asked, then lets go of it: for the tcg
/// engine, whose QEMU opens the images itself (and locks them its own way).
pub fn check_disks(disks: &[DiskSpec]) -> Result<(), SetupError> {
    for disk in disks {
        drop(Block::open(&disk.path, disk.read_only)?);
    }
    Ok(())
}

/// Checks that every tap exists and can be attached, then lets go of it: for the tcg engine,
/// whose QEMU attaches the taps itself (and would create a missing one).
pub fn check_taps(nets: &[NetSpec]) -> Result<(), SetupError> {
    for spec in nets {
        drop(Tap::open(&spec.tap, 0)?);
    }
    Ok(())
}
