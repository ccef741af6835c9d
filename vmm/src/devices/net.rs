//! virtio-net on a host tap, its rings served by the kernel's vhost-net.
//!
//! Two queues (0 receive, 1 transmit) of up to [`QUEUE_SIZE`] entries. bdvmm never touches a
//! packet: on DRIVER_OK the device hands vhost-net the guest's RAM, each ring's size and
//! addresses, the queue's notification eventfd as the kick and the interrupt's eventfd as the
//! call, then attaches the tap. From then on vhost's kernel thread moves packets between the
//! rings and the tap and signals the irqfd itself.
//!
//! # Features
//!
//! Offered: `VIRTIO_NET_F_MAC` (the configuration space holds the address), `VIRTIO_F_VERSION_1`
//! (required: the transport is virtio 1.x and the tap carries the 12-byte 1.x header), and of
//! `VIRTIO_NET_F_MRG_RXBUF` and `VIRTIO_RING_F_EVENT_IDX` those that `/dev/vhost-net` reports
//! (`VHOST_GET_FEATURES`). No checksum or segmentation offload: the tap is told to expect none
//! (`TUNSETOFFLOAD` 0), so the host kernel checksums and segments for the guest. vhost is given
//! the acked features it knows (everything but `VIRTIO_NET_F_MAC`).
//!
//! # Interrupts: the irqfd is vhost's call fd
//!
//! vhost signals the very eventfd that is registered as the device's irqfd, and the transport
//! reports the VRING bit in InterruptStatus whenever the device is live (see [`super::mmio`]).
//! The alternative, a call eventfd of our own and a thread that sets the bit and then signals the
//! irqfd, adds a thread, a wake-up and a lock on every packet interrupt, and a thread that must
//! be stopped on reset. A VRING report with nothing used costs the guest one scan of two rings
//! (`vring_interrupt` answers IRQ_NONE), and vhost only signals when it did use buffers.
//!
//! # Failures
//!
//! Everything that can be checked before the guest runs is checked in [`Net::open`]: the tap
//! exists and attaches, `/dev/vhost-net` opens ("no /dev/vhost-net: modprobe vhost_net") and
//! offers `VIRTIO_F_VERSION_1`. What fails at DRIVER_OK (a vhost ioctl refusing the rings, no
//! second `/dev/vhost-net` after a reset) is logged and marks the device NEEDS_RESET with a
//! configuration interrupt, like a broken block queue; the guest keeps running without network.
//!
//! # Reset
//!
//! A driver reset (Status 0) or a machine reset detaches the tap from vhost (`SET_BACKEND -1`)
//! and closes the vhost fd, which stops its worker; the next DRIVER_OK opens a fresh one. The tap
//! stays attached to bdvmm, so no other program can take it in between.

use std::fs::File;
use std::io;
#[cfg(test)]
use std::path::Path;
use std::sync::Arc;

use vhost::net::VhostNet;
use vhost::vhost_kern::net::Net as KernNet;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_S_LINK_UP};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use super::bus::EventFdInterrupt;
use super::mmio::{Activation, MmioTransport, QueueError, VirtioDevice};
use super::tap::{MacAddr, NetSpec, Tap, TapError};

/// Largest size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Number of queues: receive and transmit.
pub const QUEUES: usize = 2;
/// The vhost-net control device.
pub const VHOST_NET_PATH: &str = "/dev/vhost-net";
/// Features taken from vhost-net when it offers them.
const FROM_VHOST: u64 = (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_RING_F_EVENT_IDX);
/// The configuration space: `mac` and `status` of `struct virtio_net_config`.
const CONFIG_LEN: usize = 8;

/// Why a network device could not be built or started.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be attached.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// No `/dev/vhost-net`.
    #[error(
        "no {VHOST_NET_PATH}: modprobe vhost_net (bdvmm's virtio-net needs the kernel's vhost-net)"
    )]
    NoVhostNet,
    /// `/dev/vhost-net` exists but did not open.
    #[error("cannot open {VHOST_NET_PATH}: {0}: run bdvmm as root or give its user read-write access to {VHOST_NET_PATH}")]
    VhostOpen(io::Error),
    /// The kernel's vhost-net is too old for a virtio 1.x device.
    #[error("this kernel's vhost-net does not offer VIRTIO_F_VERSION_1: a newer host kernel is needed for --net")]
    NoVersion1,
    /// A vhost ioctl failed.
    #[error("vhost-net {step} failed: {err}")]
    Vhost {
        /// The step.
        step: &'static str,
        /// What vhost said.
        err: vhost::Error,
    },
    /// The transport gave no eventfd for vhost to interrupt the guest through.
    #[error("the device's interrupt has no eventfd for vhost-net to signal (give it an EventFdInterrupt)")]
    NoInterruptFd,
    /// The transport gave no notification eventfds.
    #[error("the transport has no notification eventfds for vhost-net (out of file descriptors? raise ulimit -n)")]
    NoNotifiers,
    /// The driver started the device with a queue it did not set up.
    #[error("the guest driver started the device with queue {0} not ready")]
    QueueNotReady(usize),
    /// A guest RAM region has no host mapping to give vhost.
    #[error("guest RAM at {0:#x} has no host mapping to give vhost-net")]
    Memory(u64),
}

fn vhost_err(step: &'static str) -> impl FnOnce(vhost::Error) -> NetError {
    move |err| NetError::Vhost { step, err }
}

/// The vhost-net operations the device uses: the kernel's (`/dev/vhost-net`), or a recorder in
/// tests.
pub trait VhostNetBackend: Send {
    /// `VHOST_GET_FEATURES`.
    fn get_features(&self) -> Result<u64, vhost::Error>;
    /// `VHOST_SET_OWNER`.
    fn set_owner(&self) -> Result<(), vhost::Error>;
    /// `VHOST_SET_FEATURES`.
    fn set_features(&self, features: u64) -> Result<(), vhost::Error>;
    /// `VHOST_SET_MEM_TABLE`.
    fn set_mem_table(&self, regions: &[VhostUserMemoryRegionInfo]) -> Result<(), vhost::Error>;
    /// `VHOST_SET_VRING_NUM`.
    fn set_vring_num(&self, queue: usize, num: u16) -> Result<(), vhost::Error>;
    /// `VHOST_SET_VRING_ADDR` (guest addresses; the kernel backend translates them).
    fn set_vring_addr(&self, queue: usize, config: &VringConfigData) -> Result<(), vhost::Error>;
    /// `VHOST_SET_VRING_BASE`.
    fn set_vring_base(&self, queue: usize, base: u16) -> Result<(), vhost::Error>;
    /// `VHOST_SET_VRING_CALL`.
    fn set_vring_call(&self, queue: usize, fd: &EventFd) -> Result<(), vhost::Error>;
    /// `VHOST_SET_VRING_KICK`.
    fn set_vring_kick(&self, queue: usize, fd: &EventFd) -> Result<(), vhost::Error>;
    /// `VHOST_NET_SET_BACKEND` (None detaches).
    fn set_backend(&self, queue: usize, tap: Option<&File>) -> Result<(), vhost::Error>;
}

impl VhostNetBackend for KernNet<Arc<GuestMemoryMmap>> {
    fn get_features(&self) -> Result<u64, vhost::Error> {
        VhostBackend::get_features(self)
    }
    fn set_owner(&self) -> Result<(), vhost::Error> {
        VhostBackend::set_owner(self)
    }
    fn set_features(&self, features: u64) -> Result<(), vhost::Error> {
        VhostBackend::set_features(self, features)
    }
    fn set_mem_table(&self, regions: &[VhostUserMemoryRegionInfo]) -> Result<(), vhost::Error> {
        VhostBackend::set_mem_table(self, regions).map(|_| ())
    }
    fn set_vring_num(&self, queue: usize, num: u16) -> Result<(), vhost::Error> {
        VhostBackend::set_vring_num(self, queue, num)
    }
    fn set_vring_addr(&self, queue: usize, config: &VringConfigData) -> Result<(), vhost::Error> {
        VhostBackend::set_vring_addr(self, queue, config)
    }
    fn set_vring_base(&self, queue: usize, base: u16) -> Result<(), vhost::Error> {
        VhostBackend::set_vring_base(self, queue, base)
    }
    fn set_vring_call(&self, queue: usize, fd: &EventFd) -> Result<(), vhost::Error> {
        VhostBackend::set_vring_call(self, queue, fd)
    }
    fn set_vring_kick(&self, queue: usize, fd: &EventFd) -> Result<(), vhost::Error> {
        VhostBackend::set_vring_kick(self, queue, fd)
    }
    fn set_backend(&self, queue: usize, tap: Option<&File>) -> Result<(), vhost::Error> {
        VhostNet::set_backend(self, queue, tap)
    }
}

/// Opens a fresh vhost-net instance for the guest RAM.
pub type Opener =
    Box<dyn Fn(&GuestMemoryMmap) -> Result<Box<dyn VhostNetBackend>, NetError> + Send>;

/// Opens `/dev/vhost-net` (the kernel backend).
pub fn open_kernel_vhost(mem: &GuestMemoryMmap) -> Result<Box<dyn VhostNetBackend>, NetError> {
    match KernNet::new(Arc::new(mem.clone())) {
        Ok(net) => Ok(Box::new(net)),
        Err(vhost::Error::VhostOpen(e)) if e.kind() == io::ErrorKind::NotFound => {
            Err(NetError::NoVhostNet)
        }
        Err(vhost::Error::VhostOpen(e)) => Err(NetError::VhostOpen(e)),
        Err(err) => Err(NetError::Vhost { step: "open", err }),
    }
}

/// One virtio-net device.
pub struct Net {
    tap: Tap,
    mac: MacAddr,
    /// What vhost-net offers (`VHOST_GET_FEATURES`).
    vhost_features: u64,
    /// The device features offered to the guest (VERSION_1 is the transport's).
    features: u64,
    open_vhost: Opener,
    /// The instance the features were read from, not yet owned: the first activation uses it.
    idle: Option<Box<dyn VhostNetBackend>>,
    /// The instance serving the rings.
    running: Option<Box<dyn VhostNetBackend>>,
    max_sizes: [u16; QUEUES],
}

impl Net {
    /// Attaches the tap of `spec` and opens `/dev/vhost-net`: every check that can be made
    /// before the guest runs.
    pub fn open(spec: &NetSpec, mem: &GuestMemoryMmap) -> Result<Self, NetError> {
        let tap = Tap::open(&spec.tap, 0)?;
        Self::with_backend(tap, spec.mac, mem, Box::new(open_kernel_vhost))
    }

    /// A device on `tap` whose vhost instances come from `open_vhost`.
    pub fn with_backend(
        tap: Tap,
        mac: MacAddr,
        mem: &GuestMemoryMmap,
        open_vhost: Opener,
    ) -> Result<Self, NetError> {
        let probe = open_vhost(mem)?;
        let vhost_features = probe.get_features().map_err(vhost_err("GET_FEATURES"))?;
        if vhost_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(NetError::NoVersion1);
        }
        Ok(Self {
            tap,
            mac,
            vhost_features,
            features: (1 << VIRTIO_NET_F_MAC) | (vhost_features & FROM_VHOST),
            open_vhost,
            idle: Some(probe),
            running: None,
            max_sizes: [QUEUE_SIZE; QUEUES],
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The tap's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Whether vhost is serving the rings.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac.0);
        // Only meaningful with VIRTIO_NET_F_STATUS, which is not offered: the link is up.
        let status = u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap_or(1);
        c[6..].copy_from_slice(&status.to_le_bytes());
        c
    }

    fn start(&mut self, a: &Activation<'_>) -> Result<Box<dyn VhostNetBackend>, NetError> {
        let call = a.interrupt_fd.ok_or(NetError::NoInterruptFd)?;
        if a.notifiers.len() < QUEUES {
            return Err(NetError::NoNotifiers);
        }
        if a.queues.len() < QUEUES {
            return Err(NetError::QueueNotReady(a.queues.len()));
        }
        if let Some(i) = a.queues.iter().position(|q| !q.ready()) {
            return Err(NetError::QueueNotReady(i));
        }
        let regions = memory_regions(a.mem)?;
        let vhost = match self.idle.take() {
            Some(v) => v,
            None => (self.open_vhost)(a.mem)?,
        };
        vhost.set_owner().map_err(vhost_err("SET_OWNER"))?;
        vhost
            .set_features(a.acked_features & self.vhost_features)
            .map_err(vhost_err("SET_FEATURES"))?;
        vhost
            .set_mem_table(&regions)
            .map_err(vhost_err("SET_MEM_TABLE"))?;
        for (i, (q, kick)) in a.queues.iter().zip(a.notifiers).enumerate() {
            vhost
                .set_vring_num(i, q.size())
                .map_err(vhost_err("SET_VRING_NUM"))?;
            vhost
                .set_vring_addr(i, &vring_config(q))
                .map_err(vhost_err("SET_VRING_ADDR"))?;
            vhost
                .set_vring_base(i, q.next_avail())
                .map_err(vhost_err("SET_VRING_BASE"))?;
            vhost
                .set_vring_call(i, call)
                .map_err(vhost_err("SET_VRING_CALL"))?;
            vhost
                .set_vring_kick(i, kick)
                .map_err(vhost_err("SET_VRING_KICK"))?;
        }
        for i in 0..QUEUES {
            if let Err(err) = vhost.set_backend(i, Some(self.tap.file())) {
                stop(vhost.as_ref());
                return Err(NetError::Vhost {
                    step: "NET_SET_BACKEND",
                    err,
                });
            }
        }
        Ok(vhost)
    }
}

/// Detaches the tap from every queue (before the fd is closed).
fn stop(vhost: &dyn VhostNetBackend) {
    for i in 0..QUEUES {
        if let Err(e) = vhost.set_backend(i, None) {
            tracing::debug!("vhost-net: detaching the tap from queue {i}: {e}");
        }
    }
}

fn vring_config(q: &Queue) -> VringConfigData {
    VringConfigData {
        queue_max_size: q.max_size(),
        queue_size: q.size(),
        flags: 0,
        desc_table_addr: q.desc_table(),
        used_ring_addr: q.used_ring(),
        avail_ring_addr: q.avail_ring(),
        log_addr: None,
    }
}

/// The guest RAM as vhost's memory table: guest address, size, and where bdvmm maps it.
pub fn memory_regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, NetError> {
    mem.iter()
        .map(|r| {
            let guest = r.start_addr().0;
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| NetError::Memory(guest))?;
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr: guest,
                memory_size: r.len(),
                userspace_addr: u64::try_from(host.addr()).map_err(|_| NetError::Memory(guest))?,
                ..Default::default()
            })
        })
        .collect()
}

impl VirtioDevice for Net {
    type ActivateError = NetError;

    fn device_id(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn activate(&mut self, activation: &Activation<'_>) -> Result<(), NetError> {
        self.reset();
        let vhost = self.start(activation)?;
        self.running = Some(vhost);
        Ok(())
    }

    fn offloaded(&self) -> bool {
        true
    }

    fn process_queue(
        &mut self,
        _index: usize,
        _queue: &mut Queue,
        _mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        // vhost serves the rings; the transport does not call this for an offloaded device.
        Ok(false)
    }

    fn reset(&mut self) {
        if let Some(vhost) = self.running.take() {
            stop(vhost.as_ref());
        }
    }
}

/// The whole device for the kvm engine: the tap of `spec` attached, vhost-net opened, behind a
/// virtio-mmio transport interrupting through `irq` (whose eventfd becomes vhost's call fd and
/// must be registered as the slot's irqfd). Register [`MmioTransport::notifiers`] as
/// ioeventfds; the kernel consumes them.
pub fn build(
    spec: &NetSpec,
    mem: GuestMemoryMmap,
    irq: Arc<EventFdInterrupt>,
) -> Result<MmioTransport<Net>, NetError> {
    let net = Net::open(spec, &mem)?;
    Ok(MmioTransport::new(net, mem, irq))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    };
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::mmio::Interrupt;
    use crate::devices::tap::tests::{in_netns, make_interface};

    const RAM: u64 = 0x20_0000;
    /// Ring addresses per queue: (desc, avail, used).
    const RINGS: [(u64, u64, u64); 2] = [
        (0x1_0000, 0x1_1000, 0x1_2000),
        (0x2_0000, 0x2_1000, 0x2_2000),
    ];
    const VHOST_OFFERS: u64 = (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_NET_F_MRG_RXBUF)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << 26); // VHOST_F_LOG_ALL: never offered to the guest

    #[derive(Debug, PartialEq, Eq)]
    enum Call {
        Owner,
        Features(u64),
        MemTable(Vec<(u64, u64, u64)>),
        Num(usize, u16),
        Addr(usize, u64, u64, u64),
        Base(usize, u16),
        Irq(usize),
        Kick(usize),
        Backend(usize, bool),
    }

    #[derive(Default)]
    struct Log {
        calls: Mutex<Vec<Call>>,
        /// Clones of the eventfds vhost was given, per queue.
        kicks: Mutex<Vec<EventFd>>,
        calls_fds: Mutex<Vec<EventFd>>,
        opened: AtomicUsize,
        dropped: AtomicUsize,
    }

    struct Fake {
        log: Arc<Log>,
        features: u64,
        fail_addr: bool,
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.log.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Fake {
        fn push(&self, c: Call) -> Result<(), vhost::Error> {
            self.log.calls.lock().unwrap().push(c);
            Ok(())
        }
    }

    impl VhostNetBackend for Fake {
        fn get_features(&self) -> Result<u64, vhost::Error> {
            Ok(self.features)
        }
        fn set_owner(&self) -> Result<(), vhost::Error> {
            self.push(Call::Owner)
        }
        fn set_features(&self, f: u64) -> Result<(), vhost::Error> {
            self.push(Call::Features(f))
        }
        fn set_mem_table(&self, r: &[VhostUserMemoryRegionInfo]) -> Result<(), vhost::Error> {
            let r = r
                .iter()
                .map(|r| (r.guest_phys_addr, r.memory_size, r.userspace_addr))
                .collect();
            self.push(Call::MemTable(r))
        }
        fn set_vring_num(&self, q: usize, num: u16) -> Result<(), vhost::Error> {
            self.push(Call::Num(q, num))
        }
        fn set_vring_addr(&self, q: usize, c: &VringConfigData) -> Result<(), vhost::Error> {
            if self.fail_addr {
                return Err(vhost::Error::InvalidQueue);
            }
            self.push(Call::Addr(
                q,
                c.desc_table_addr,
                c.avail_ring_addr,
                c.used_ring_addr,
            ))
        }
        fn set_vring_base(&self, q: usize, base: u16) -> Result<(), vhost::Error> {
            self.push(Call::Base(q, base))
        }
        fn set_vring_call(&self, q: usize, fd: &EventFd) -> Result<(), vhost::Error> {
            self.log
                .calls_fds
                .lock()
                .unwrap()
                .push(fd.try_clone().unwrap());
            self.push(Call::Irq(q))
        }
        fn set_vring_kick(&self, q: usize, fd: &EventFd) -> Result<(), vhost::Error> {
            self.log.kicks.lock().unwrap().push(fd.try_clone().unwrap());
            self.push(Call::Kick(q))
        }
        fn set_backend(&self, q: usize, tap: Option<&File>) -> Result<(), vhost::Error> {
            self.push(Call::Backend(q, tap.is_some()))
        }
    }

    fn opener(log: Arc<Log>, features: u64, fail_addr: bool) -> Opener {
        Box::new(move |_mem| {
            log.opened.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(Fake {
                log: log.clone(),
                features,
                fail_addr,
            }))
        })
    }

    struct Guest<I: Interrupt + 'static> {
        mem: GuestMemoryMmap,
        dev: MmioTransport<Net>,
        irq: Arc<I>,
        log: Arc<Log>,
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(RAM).unwrap())]).unwrap()
    }

    fn guest_with<I: Interrupt + 'static>(irq: I, features: u64, fail_addr: bool) -> Guest<I> {
        let mem = memory();
        let log = Arc::new(Log::default());
        let net = Net::with_backend(
            Tap::stand_in("t0"),
            MacAddr([2, 1, 2, 3, 4, 5]),
            &mem,
            opener(log.clone(), features, fail_addr),
        )
        .unwrap();
        let irq = Arc::new(irq);
        let dev = MmioTransport::new(net, mem.clone(), irq.clone());
        Guest { mem, dev, irq, log }
    }

    fn guest() -> Guest<EventFdInterrupt> {
        guest_with(EventFdInterrupt::new().unwrap(), VHOST_OFFERS, false)
    }

    const S: u32 =
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;

    impl<I: Interrupt> Guest<I> {
        fn r(&self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.dev.read(offset, &mut b);
            u32::from_le_bytes(b)
        }

        fn w(&mut self, offset: u64, value: u32) {
            self.dev.write(offset, &value.to_le_bytes());
        }

        fn features(&mut self) -> u64 {
            self.w(0x14, 0);
            let low = self.r(0x10);
            self.w(0x14, 1);
            u64::from(low) | (u64::from(self.r(0x10)) << 32)
        }

        /// What Linux does up to DRIVER_OK, with `queues` of the two set up.
        fn bring_up(&mut self, queues: usize) {
            self.w(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
            self.w(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
            let features = self.features();
            self.w(0x24, 0);
            self.w(0x20, u32::try_from(features & 0xffff_ffff).unwrap());
            self.w(0x24, 1);
            self.w(0x20, u32::try_from(features >> 32).unwrap());
            self.w(0x70, S);
            assert_eq!(self.r(0x70), S);
            for (i, (desc, avail, used)) in RINGS.iter().take(queues).enumerate() {
                self.w(0x30, u32::try_from(i).unwrap());
                assert_eq!(self.r(0x34), u32::from(QUEUE_SIZE));
                self.w(0x38, u32::from(QUEUE_SIZE));
                self.w(0x80, u32::try_from(*desc).unwrap());
                self.w(0x90, u32::try_from(*avail).unwrap());
                self.w(0xa0, u32::try_from(*used).unwrap());
                self.w(0x44, 1);
                assert_eq!(self.r(0x44), 1);
            }
            self.w(0x70, S | VIRTIO_CONFIG_S_DRIVER_OK);
        }

        fn calls(&self) -> Vec<Call> {
            std::mem::take(&mut *self.log.calls.lock().unwrap())
        }
    }

    fn expected_start(mem: &GuestMemoryMmap, acked_by_vhost: u64) -> Vec<Call> {
        let host = mem.get_host_address(GuestAddress(0)).unwrap().addr();
        let mut v = vec![
            Call::Owner,
            Call::Features(acked_by_vhost),
            Call::MemTable(vec![(0, RAM, u64::try_from(host).unwrap())]),
        ];
        for (i, (d, a, u)) in RINGS.iter().enumerate() {
            v.extend([
                Call::Num(i, QUEUE_SIZE),
                Call::Addr(i, *d, *a, *u),
                Call::Base(i, 0),
                Call::Irq(i),
                Call::Kick(i),
            ]);
        }
        v.extend([Call::Backend(0, true), Call::Backend(1, true)]);
        v
    }

    #[test]
    fn a_net_device_with_the_mac_in_its_config_space() {
        let mut g = guest();
        assert_eq!(g.r(0x08), 1, "device id 1: network");
        for q in 0..2 {
            g.w(0x30, q);
            assert_eq!(g.r(0x34), 256);
        }
        g.w(0x30, 2);
        assert_eq!(g.r(0x34), 0, "two queues only");
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            let mut one = [0u8; 1];
            g.dev.read(0x100 + u64::try_from(i).unwrap(), &mut one);
            *b = one[0];
        }
        assert_eq!(mac, [2, 1, 2, 3, 4, 5]);
        assert_eq!(g.r(0x100), u32::from_le_bytes([2, 1, 2, 3]));
        let mut status = [0u8; 2];
        g.dev.read(0x106, &mut status);
        assert_eq!(u16::from_le_bytes(status), 1, "link up");
        assert_eq!(g.r(0x108), 0, "nothing past the status");
        assert_eq!(g.r(0x1000 - 4), 0);
        // The guest cannot change the MAC.
        g.w(0x100, 0xffff_ffff);
        assert_eq!(g.r(0x100), u32::from_le_bytes([2, 1, 2, 3]));
        assert_eq!(g.dev.device().mac(), MacAddr([2, 1, 2, 3, 4, 5]));
        assert_eq!(g.dev.device().tap_name(), "t0");
    }

    #[test]
    fn features_are_mac_version_1_and_what_vhost_offers_of_the_wanted() {
        let mut g = guest();
        assert_eq!(
            g.features(),
            (1 << VIRTIO_NET_F_MAC)
                | (1 << VIRTIO_F_VERSION_1)
                | (1 << VIRTIO_NET_F_MRG_RXBUF)
                | (1 << VIRTIO_RING_F_EVENT_IDX)
        );
        let mut g = guest_with(
            EventFdInterrupt::new().unwrap(),
            1 << VIRTIO_F_VERSION_1,
            false,
        );
        assert_eq!(
            g.features(),
            (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_F_VERSION_1)
        );
        // A vhost-net without VERSION_1 cannot serve a virtio 1.x device.
        let log = Arc::new(Log::default());
        let e = Net::with_backend(
            Tap::stand_in("t0"),
            MacAddr([2, 0, 0, 0, 0, 1]),
            &memory(),
            opener(log, 1 << VIRTIO_NET_F_MRG_RXBUF, false),
        )
        .err()
        .unwrap();
        assert!(matches!(e, NetError::NoVersion1), "{e}");
    }

    #[test]
    fn driver_ok_hands_vhost_the_memory_the_rings_and_the_eventfds() {
        let mut g = guest();
        assert_eq!(g.log.opened.load(Ordering::SeqCst), 1, "probed once");
        g.bring_up(2);
        assert!(g.dev.is_live());
        assert!(g.dev.device().is_running());
        // MAC is not vhost's; LOG_ALL was never offered.
        let acked = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(g.calls(), expected_start(&g.mem, acked));
        assert_eq!(
            g.log.opened.load(Ordering::SeqCst),
            1,
            "the probe is reused"
        );

        // The kick vhost waits on is what a guest notification signals: through an MMIO write
        // to QueueNotify, or the ioeventfd the engine registers.
        let kicks = g
            .log
            .kicks
            .lock()
            .unwrap()
            .iter()
            .map(|k| k.try_clone().unwrap())
            .collect::<Vec<_>>();
        g.w(0x50, 1);
        assert_eq!(kicks[1].read().unwrap(), 1);
        assert!(kicks[0].read().is_err(), "queue 0 was not kicked");
        let notifiers = g.dev.notifiers().unwrap();
        assert_eq!(
            notifiers
                .iter()
                .map(|n| (n.queue, n.serve))
                .collect::<Vec<_>>(),
            vec![(0, false), (1, false)],
            "the engine registers both and leaves them to the kernel"
        );
        notifiers[0].fd.write(1).unwrap();
        assert_eq!(kicks[0].read().unwrap(), 1);
        // vhost's call fd is the irqfd.
        for c in g.log.calls_fds.lock().unwrap().iter() {
            c.write(1).unwrap();
        }
        assert_eq!(g.irq.0.read().unwrap(), 2);
        // Linux services the rings only when it sees VRING: reported while live, acked or not.
        assert_eq!(g.r(0x60), 1);
        g.w(0x64, 1);
        assert_eq!(g.r(0x60), 1);
    }

    #[test]
    fn reset_detaches_the_tap_and_the_next_start_uses_a_fresh_vhost() {
        let mut g = guest();
        g.bring_up(2);
        g.calls();
        g.w(0x70, 0);
        assert_eq!(
            g.calls(),
            vec![Call::Backend(0, false), Call::Backend(1, false)]
        );
        assert_eq!(
            g.log.dropped.load(Ordering::SeqCst),
            1,
            "the vhost fd is closed"
        );
        assert!(!g.dev.device().is_running());
        assert_eq!(g.r(0x60), 0, "no VRING once reset");
        g.w(0x50, 0);
        assert!(
            g.log.kicks.lock().unwrap()[0].read().is_err(),
            "no kicks while reset"
        );

        g.bring_up(2);
        assert_eq!(g.log.opened.load(Ordering::SeqCst), 2);
        assert_eq!(g.calls().first(), Some(&Call::Owner));
        assert!(g.dev.is_live());
        // A machine reset does the same.
        g.dev.hard_reset();
        assert_eq!(
            g.calls(),
            vec![Call::Backend(0, false), Call::Backend(1, false)]
        );
        assert_eq!(g.log.dropped.load(Ordering::SeqCst), 2);
    }

    fn assert_needs_reset<I: Interrupt>(g: &Guest<I>) {
        assert_ne!(g.r(0x70) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(!g.dev.is_live());
        assert!(!g.dev.device().is_running());
        assert_eq!(g.r(0x60), 2, "a configuration interrupt, no VRING");
    }

    #[test]
    fn a_start_vhost_refuses_needs_a_reset_and_attaches_nothing() {
        let mut g = guest_with(EventFdInterrupt::new().unwrap(), VHOST_OFFERS, true);
        g.bring_up(2);
        assert_needs_reset(&g);
        assert_eq!(g.irq.0.read().unwrap(), 1);
        assert!(!g
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Backend(_, true))));
        assert_eq!(
            g.log.dropped.load(Ordering::SeqCst),
            1,
            "the refused fd is closed"
        );
    }

    #[test]
    fn driver_ok_without_both_queues_needs_a_reset() {
        let mut g = guest();
        g.bring_up(1);
        assert_needs_reset(&g);
        assert!(g.calls().is_empty(), "vhost was not touched");
    }

    #[derive(Default)]
    struct NoFd(AtomicUsize);

    impl Interrupt for NoFd {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn an_interrupt_without_an_eventfd_cannot_serve_vhost() {
        let mut g = guest_with(NoFd::default(), VHOST_OFFERS, false);
        g.bring_up(2);
        assert_needs_reset(&g);
        assert_eq!(g.irq.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn without_dev_vhost_net_the_device_is_refused_before_the_guest_runs() {
        if Path::new(VHOST_NET_PATH).exists() {
            eprintln!("skipped: this host has {VHOST_NET_PATH}");
            return;
        }
        let e = open_kernel_vhost(&memory()).err().unwrap();
        assert!(matches!(e, NetError::NoVhostNet), "{e}");
        assert!(e
            .to_string()
            .starts_with("no /dev/vhost-net: modprobe vhost_net"));
        // Through the whole build: the tap attaches, then vhost-net is missing.
        in_netns(|| {
            make_interface("bdn0", true);
            let spec: NetSpec = "tap=bdn0".parse().unwrap();
            let irq = Arc::new(EventFdInterrupt::new().unwrap());
            let e = build(&spec, memory(), irq.clone()).err().unwrap();
            assert!(matches!(e, NetError::NoVhostNet), "{e}");
            let spec: NetSpec = "tap=bdmissing".parse().unwrap();
            let e = build(&spec, memory(), irq).err().unwrap();
            assert!(matches!(e, NetError::Tap(TapError::NoSuchTap(_))), "{e}");
        });
    }
}
