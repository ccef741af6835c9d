//! The virtio-mmio transport (virtio 1.x, "version 2" register layout).
//!
//! [`MmioTransport`] owns one [`VirtioDevice`] and its queues and decodes the 0x100-byte register
//! file plus the device's configuration space behind it. Every value the guest writes is
//! untrusted: queue registers are accepted only while the queue is not ready, features only while
//! the driver is negotiating, and a queue is activated only if its rings lie in guest memory.
//!
//! # Devices served outside bdvmm (vhost)
//!
//! A device whose [`VirtioDevice::offloaded`] is true (virtio-net on vhost-net) has its rings
//! served by the host kernel: on DRIVER_OK it gets an [`Activation`] with the queues' sizes and
//! ring addresses, one notification eventfd per queue (the kick: what a guest write of the queue
//! index to QueueNotify signals, through an ioeventfd or [`MmioTransport::notify`]) and the
//! eventfd behind the interrupt (the irqfd), which vhost signals itself. Because Linux's
//! virtio_mmio interrupt handler services the rings only when InterruptStatus has the VRING bit,
//! and vhost cannot set that bit, the transport reports VRING whenever such a device is live; a
//! report with nothing used is harmless (the guest's `vring_interrupt` finds nothing and returns).
//!
//! # Notifications
//!
//! [`MmioTransport::notifiers`] lists, per queue, an eventfd the engine registers as an ioeventfd
//! at the window's base + [`QUEUE_NOTIFY_OFFSET`] with the queue index as 4-byte datamatch. For an
//! ordinary device the engine then watches the fd and calls [`MmioTransport::notify`]; for an
//! offloaded one the kernel watches it and the engine must not read it.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The non-legacy virtio-mmio version.
pub const MMIO_VERSION: u32 = 2;
/// Size of one device's MMIO window (registers and configuration space).
pub const MMIO_WINDOW: u64 = 0x1000;
/// Vendor id the device reports ("BDVM").
pub const VENDOR_ID: u32 = 0x4d56_4442;

// Register offsets (virtio 1.2 section 4.2.2).
const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = QUEUE_NOTIFY_OFFSET;
/// Offset of the QueueNotify register in a device's window: where an ioeventfd goes.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_AVAIL_LOW: u64 = 0x090;
const QUEUE_AVAIL_HIGH: u64 = 0x094;
const QUEUE_USED_LOW: u64 = 0x0a0;
const QUEUE_USED_HIGH: u64 = 0x0a4;
const SHM_LEN_LOW: u64 = 0x0b0;
const SHM_LEN_HIGH: u64 = 0x0b4;
const SHM_BASE_LOW: u64 = 0x0b8;
const SHM_BASE_HIGH: u64 = 0x0bc;
const CONFIG_GENERATION: u64 = 0x0fc;
/// Where the device-specific configuration space starts.
pub const CONFIG_SPACE: u64 = 0x100;

/// Why a device could not process a queue. The transport answers any of these by marking the
/// device NEEDS_RESET and raising a configuration interrupt; the guest then resets it.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The available ring is corrupt (an index that runs ahead by more than the queue size).
    #[error("the guest's available ring is corrupt: {0}")]
    Ring(virtio_queue::Error),
    /// A used-ring entry could not be written.
    #[error("cannot complete a request in the used ring: {0}")]
    Used(virtio_queue::Error),
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation<'a> {
    /// The features the driver accepted (transport bits included).
    pub acked_features: u64,
    /// The queues as the driver configured them: size, ring addresses, ready.
    pub queues: &'a [Queue],
    /// Per queue, the eventfd a guest notification signals (see [`MmioTransport::notifiers`]).
    /// Empty if the transport could not create them.
    pub notifiers: &'a [EventFd],
    /// The eventfd behind the device's interrupt (the irqfd), if the interrupt has one.
    pub interrupt_fd: Option<&'a EventFd>,
    /// The guest's RAM.
    pub mem: &'a GuestMemoryMmap,
}

/// One queue notification eventfd of a device, for the engine to register as an ioeventfd.
pub struct Notifier {
    /// The queue index: the ioeventfd's datamatch (a 4-byte write at QueueNotify).
    pub queue: u32,
    /// A duplicate of the transport's eventfd for the queue.
    pub fd: EventFd,
    /// Whether the engine must watch `fd` and call [`MmioTransport::notify`] when it fires.
    /// False for an offloaded (vhost) device: the kernel consumes the eventfd.
    pub serve: bool,
}

/// One virtio device behind a transport.
pub trait VirtioDevice {
    /// Why activation failed (`std::convert::Infallible` for a device that cannot fail).
    type ActivateError: std::error::Error;
    /// The virtio device id (2 for block).
    fn device_id(&self) -> u32;
    /// Device-specific feature bits. The transport adds `VIRTIO_F_VERSION_1` itself.
    fn device_features(&self) -> u64;
    /// Largest size of each of the device's queues; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads configuration space at `offset` (from the start of configuration space). Bytes past
    /// the end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes configuration space; devices with nothing writable ignore it.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Called once the driver has set DRIVER_OK, with the features it accepted and the queue
    /// configuration. An error marks the device NEEDS_RESET (the guest sees a configuration
    /// interrupt) and is logged.
    fn activate(&mut self, _activation: &Activation<'_>) -> Result<(), Self::ActivateError> {
        Ok(())
    }
    /// Whether the queues are served outside bdvmm (vhost): the transport then never calls
    /// [`VirtioDevice::process_queue`], forwards notifications to the queue's eventfd, and
    /// reports the VRING interrupt bit whenever the device is live.
    fn offloaded(&self) -> bool {
        false
    }
    /// Consumes every available chain of queue `index`. Returns whether any used-ring entry was
    /// added (and so whether the guest may need an interrupt).
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError>;
    /// Forgets whatever the driver set up; the device's backing (an image file) stays.
    fn reset(&mut self) {}
}

/// How the transport interrupts the guest: an irqfd's eventfd in the kvm engine, a counter in
/// tests.
pub trait Interrupt: Send + Sync {
    /// Raises the device's interrupt line (edge).
    fn trigger(&self);
    /// The eventfd that raises the line when written, if there is one (an irqfd's), for a
    /// backend that interrupts the guest by itself (vhost).
    fn eventfd(&self) -> Option<&EventFd> {
        None
    }
}

/// A virtio-mmio device: the register file and the device behind it.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    irq: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    /// Per queue, the notification eventfd (empty if they could not be created).
    notifiers: Vec<EventFd>,
    /// Per queue: the driver's last QueueNum was refused.
    size_rejected: Vec<bool>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

fn u32_le(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.try_into().ok()?))
}

fn set_half(old: u64, value: u32, high: bool) -> u64 {
    if high {
        (old & 0xffff_ffff) | (u64::from(value) << 32)
    } else {
        (old & !0xffff_ffff) | u64::from(value)
    }
}

fn half(value: u64, high: bool) -> u32 {
    let v = if high { value >> 32 } else { value };
    u32::try_from(v & 0xffff_ffff).unwrap_or(0)
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Puts `device` behind a fresh register file.
    pub fn new(device: D, mem: GuestMemoryMmap, irq: Arc<dyn Interrupt>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect::<Vec<_>>();
        // Without eventfds (the process is out of descriptors) notifications still arrive as
        // MMIO writes; only an offloaded device cannot work, and says so when activated.
        let notifiers = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_default();
        Self {
            device,
            mem,
            irq,
            notifiers,
            size_rejected: vec![false; queues.len()],
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// Per queue, a duplicate of its notification eventfd, for the engine to register with
    /// `VmFd::register_ioevent(&n.fd, &IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET),
    /// n.queue)`. Empty if the transport has no eventfds.
    pub fn notifiers(&self) -> std::io::Result<Vec<Notifier>> {
        let serve = !self.device.offloaded();
        let mut out = Vec::with_capacity(self.notifiers.len());
        for (i, fd) in self.notifiers.iter().enumerate() {
            let Ok(queue) = u32::try_from(i) else { break };
            out.push(Notifier {
                queue,
                fd: fd.try_clone()?,
                serve,
            });
        }
        Ok(out)
    }

    /// The device status register (for tests and the API).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Every feature the device offers, transport bits included.
    pub fn offered_features(&self) -> u64 {
        self.device.device_features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(sel)
    }

    /// The selected queue, if its registers may be written (it exists and is not ready).
    fn writable_queue(&mut self) -> Option<&mut Queue> {
        self.selected_queue().filter(|q| !q.ready())
    }

    /// Resets the transport and device as a machine reset does (the same as the driver writing 0
    /// to Status): the next guest finds a fresh device on the same backing.
    pub fn hard_reset(&mut self) {
        self.reset();
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.size_rejected.fill(false);
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    /// Handles a guest read of `data.len()` bytes at `offset` in the window. Registers answer
    /// aligned 32-bit reads only; anything else reads as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let sel = usize::try_from(self.queue_sel).ok();
        let queue = sel.and_then(|s| self.queues.get(s));
        let value = match offset {
            MAGIC => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_id(),
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => half(self.offered_features(), false),
                1 => half(self.offered_features(), true),
                _ => 0,
            },
            QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => {
                // vhost signals the irqfd without a way to set this bit: see the module docs.
                if self.device.offloaded() && self.is_live() {
                    self.interrupt_status | VIRTIO_MMIO_INT_VRING
                } else {
                    self.interrupt_status
                }
            }
            STATUS => self.status,
            QUEUE_DESC_LOW => queue.map_or(0, |q| half(q.desc_table(), false)),
            QUEUE_DESC_HIGH => queue.map_or(0, |q| half(q.desc_table(), true)),
            QUEUE_AVAIL_LOW => queue.map_or(0, |q| half(q.avail_ring(), false)),
            QUEUE_AVAIL_HIGH => queue.map_or(0, |q| half(q.avail_ring(), true)),
            QUEUE_USED_LOW => queue.map_or(0, |q| half(q.used_ring(), false)),
            QUEUE_USED_HIGH => queue.map_or(0, |q| half(q.used_ring(), true)),
            // No shared-memory regions: a length of all ones says "not present".
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Handles a guest write at `offset` in the window. Malformed accesses are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & VIRTIO_CONFIG_S_FAILED == 0 {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        if offset % 4 != 0 {
            return;
        }
        let Some(value) = u32_le(data) else {
            return;
        };
        let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES if negotiating => match self.driver_features_sel {
                0 => self.driver_features = set_half(self.driver_features, value, false),
                1 => self.driver_features = set_half(self.driver_features, value, true),
                _ => {}
            },
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM => {
                let sel = usize::try_from(self.queue_sel).ok();
                if let Some(q) = self.writable_queue() {
                    // An invalid size (zero, not a power of two, above the max) leaves the queue
                    // unable to become ready until a valid one is written: the driver would lay
                    // its rings out for a size the device does not use.
                    let ok = u16::try_from(value).is_ok_and(|size| q.try_set_size(size).is_ok());
                    if let Some(bad) = sel.and_then(|s| self.size_rejected.get_mut(s)) {
                        *bad = !ok;
                    }
                }
            }
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH => {
                if let Some(q) = self.writable_queue() {
                    let v = set_half(q.desc_table(), value, offset == QUEUE_DESC_HIGH);
                    q.set_desc_table_address(Some(half(v, false)), Some(half(v, true)));
                }
            }
            QUEUE_AVAIL_LOW | QUEUE_AVAIL_HIGH => {
                if let Some(q) = self.writable_queue() {
                    let v = set_half(q.avail_ring(), value, offset == QUEUE_AVAIL_HIGH);
                    q.set_avail_ring_address(Some(half(v, false)), Some(half(v, true)));
                }
            }
            QUEUE_USED_LOW | QUEUE_USED_HIGH => {
                if let Some(q) = self.writable_queue() {
                    let v = set_half(q.used_ring(), value, offset == QUEUE_USED_HIGH);
                    q.set_used_ring_address(Some(half(v, false)), Some(half(v, true)));
                }
            }
            QUEUE_READY => self.write_queue_ready(value),
            QUEUE_NOTIFY => {
                if let Ok(index) = usize::try_from(value) {
                    self.notify(index);
                }
            }
            INTERRUPT_ACK => self.interrupt_status &= !value,
            STATUS => self.write_status(value),
            _ => {}
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let Some(sel) = usize::try_from(self.queue_sel).ok() else {
            return;
        };
        let size_rejected = self.size_rejected.get(sel).copied().unwrap_or(true);
        let Some(q) = self.queues.get_mut(sel) else {
            return;
        };
        match value {
            0 => q.set_ready(false),
            1 => {
                // The rings must be aligned, sized and inside guest RAM before the device will
                // read them; otherwise the queue stays not ready.
                q.set_ready(true);
                if size_rejected || !q.is_valid(&self.mem) {
                    q.set_ready(false);
                }
            }
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (virtio 1.2 section 2.1.2); clearing any needs a reset.
        if value & self.status != self.status {
            return;
        }
        let new = value & !self.status;
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.offered_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                self.status = value & !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
                return;
            }
        }
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
                && new & VIRTIO_CONFIG_S_FEATURES_OK == 0
            {
                return;
            }
            let activation = Activation {
                acked_features: self.driver_features,
                queues: &self.queues,
                notifiers: &self.notifiers,
                interrupt_fd: self.irq.eventfd(),
                mem: &self.mem,
            };
            if let Err(e) = self.device.activate(&activation) {
                tracing::error!(
                    "virtio device {} cannot start: {e}",
                    self.device.device_id()
                );
                self.status = value | VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
                self.irq.trigger();
                return;
            }
        }
        self.status = value;
    }

    /// Whether the driver has brought the device up and not broken it since.
    pub fn is_live(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) == 0
    }

    /// Processes queue `index` as if the guest had written it to QueueNotify (what an ioeventfd
    /// handler calls), and interrupts the guest if a request completed.
    pub fn notify(&mut self, index: usize) {
        if !self.is_live() {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        if self.device.offloaded() {
            // The kernel serves the queue: pass the kick on (what an ioeventfd would have done).
            if let Some(fd) = self.notifiers.get(index) {
                let _ = fd.write(1);
            }
            return;
        }
        match self.device.process_queue(index, queue, &self.mem) {
            Ok(true) => {
                self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
                self.irq.trigger();
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!("virtio device {}: {e}", self.device.device_id());
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
                self.irq.trigger();
            }
        }
    }
}
