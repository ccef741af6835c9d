//! The monitor's side: the paper's calls over a bridge session, and guest memory as an
//! [`introspect`] source so the process table can be read remotely.
//!
//! ```no_run
//! use bridge_client::client::{Bridge, BridgeMem};
//! use bridge_client::tls::Identity;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let id = Identity::from_pki_dir("pki".as_ref(), "mon1");
//! let mut bridge = Bridge::connect("10.0.0.1:7070", &id)?;
//! let sb = bridge.sensor_box()?;                 // fetch_sb(node)
//! println!("{} processes", sb.value(3).unwrap_or(0));
//! let mem = BridgeMem::new(bridge);              // introspect over the bridge
//! let table = mem.process_table(None)?;          // lock, walk, unlock
//! println!("{} tasks, lock taken {} time(s)", table.value.len(), table.attempts);
//! # Ok(()) }
//! ```

use std::cell::{Cell, RefCell, RefMut};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use introspect::cache::CachedMem;
use introspect::consistency::{Locked, Pausable};
use introspect::mem::{MemError, PhysMem};
use introspect::sensorbox::{self, SensorBox};
use introspect::target::{KernelFiles, Target, TargetError};
use introspect::tasks::{Limits, Process, TaskError};
use rustls::{ClientConnection, StreamOwned};

use crate::batch::{self, BatchLimits};
use crate::tls::{Identity, TlsError};
use crate::wire::{self, Decoder, Frame, Message, Range, Regs, Reply, Request};

/// How long a connect, a handshake or one reply may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lease the client asks for when it locks on its own behalf.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(2);

/// Errors talking to a bridge.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Network trouble.
    #[error("bridge {addr}: {source}")]
    Io {
        /// The bridge.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// TLS setup.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// TLS session.
    #[error("TLS: {0}")]
    Session(String),
    /// A frame that does not decode.
    #[error("bridge sent a bad frame: {0}")]
    Wire(#[from] wire::WireError),
    /// The bridge refused or failed the request.
    #[error("bridge refused ({code}): {message}")]
    Remote {
        /// A [`wire::code`].
        code: u16,
        /// Its explanation.
        message: String,
    },
    /// The bridge answered with something that does not fit the request.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Why reading the guest kernel over a bridge failed: the session (a [`ClientError`]) or what the
/// guest's memory holds (located and walked by [`introspect`]).
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The session.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Locating the kernel.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// Walking the task list.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// A stock guest's virtual sensors.
    #[error(transparent)]
    Virtual(#[from] introspect::virtual_sensors::VirtualError),
}

impl ClientError {
    /// The bridge's error code, if the bridge refused.
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The reply to request `id` in frame `f`: an `ERROR` reply becomes [`ClientError::Remote`], a
/// frame for another request or a request from the bridge a protocol error.
pub(crate) fn reply_to(id: u64, f: Frame) -> Result<Reply, ClientError> {
    if f.request_id != id {
        return Err(ClientError::Protocol(format!(
            "reply to request {} while waiting for {id}",
            f.request_id
        )));
    }
    match f.message {
        Message::Reply(Reply::Error { code, message }) => {
            Err(ClientError::Remote { code, message })
        }
        Message::Reply(r) => Ok(r),
        Message::Request(_) => Err(ClientError::Protocol("the bridge sent a request".into())),
    }
}

/// The HELLO request of monitor `name`, with a fresh random nonce.
pub(crate) fn hello(name: &str) -> Request {
    let mut nonce = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce);
    Request::Hello {
        monitor_id: name.to_owned(),
        nonce: u64::from_le_bytes(nonce),
    }
}

/// The VM's backdoor range `(gpa, size)` from the bridge's answer to HELLO.
pub(crate) fn backdoor_of(r: Reply) -> Result<(u64, u64), ClientError> {
    match r {
        Reply::Hello {
            backdoor_gpa,
            backdoor_size,
            ..
        } => Ok((backdoor_gpa, backdoor_size)),
        r => Err(unexpected("HELLO", &r)),
    }
}

/// One authenticated session with a bridge.
pub struct Bridge {
    s: StreamOwned<ClientConnection, TcpStream>,
    dec: Decoder,
    next_id: u64,
    addr: String,
    backdoor: (u64, u64),
    buf: Vec<u8>,
}

impl Bridge {
    /// Connects, completes mutual TLS and HELLO, with [`DEFAULT_TIMEOUT`].
    pub fn connect(addr: impl ToSocketAddrs, id: &Identity) -> Result<Bridge, ClientError> {
        Self::connect_timeout(addr, id, DEFAULT_TIMEOUT)
    }

    /// As [`Bridge::connect`], with a timeout for the connect and for each reply.
    pub fn connect_timeout(
        addr: impl ToSocketAddrs,
        id: &Identity,
        timeout: Duration,
    ) -> Result<Bridge, ClientError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| ClientError::Io {
                addr: "?".into(),
                source,
            })?
            .collect();
        let a = *addrs.first().ok_or_else(|| ClientError::Io {
            addr: "?".into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address"),
        })?;
        let io = |source| ClientError::Io {
            addr: a.to_string(),
            source,
        };
        let tcp = TcpStream::connect_timeout(&a, timeout).map_err(io)?;
        tcp.set_nodelay(true).map_err(io)?;
        tcp.set_read_timeout(Some(timeout)).map_err(io)?;
        tcp.set_write_timeout(Some(timeout)).map_err(io)?;
        let (cfg, name) = id.client_config()?;
        let conn =
            ClientConnection::new(cfg, name).map_err(|e| ClientError::Session(e.to_string()))?;
        let mut s = StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn
                .complete_io(&mut s.sock)
                .map_err(|e| ClientError::Session(format!("handshake with {a}: {e}")))?;
        }
        let mut b = Bridge {
            s,
            dec: Decoder::new(),
            next_id: 1,
            addr: a.to_string(),
            backdoor: (0, 0),
            buf: vec![0u8; 256 << 10],
        };
        b.backdoor = backdoor_of(b.call(hello(&id.name))?)?;
        Ok(b)
    }

    /// The bridge's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The VM's backdoor range `(gpa, size)`, as the bridge announced it.
    pub fn backdoor(&self) -> (u64, u64) {
        self.backdoor
    }

    /// Sends one request and waits for its reply. An `ERROR` reply becomes [`ClientError::Remote`].
    pub fn call(&mut self, req: Request) -> Result<Reply, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = wire::encode(&Frame::request(id, req))?;
        let io = |source| ClientError::Io {
            addr: self.addr.clone(),
            source,
        };
        self.s.write_all(&bytes).map_err(io)?;
        self.s.flush().map_err(io)?;
        loop {
            if let Some(f) = self.dec.next_frame()? {
                return reply_to(id, f);
            }
            let n = self
                .s
                .read(&mut self.buf)
                .map_err(|source| ClientError::Io {
                    addr: self.addr.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(ClientError::Io {
                    addr: self.addr.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the bridge closed the session",
                    ),
                });
            }
            self.dec.push(&self.buf[..n])?;
        }
    }

    /// `fetch_sb(node)`: the raw Sensor Box, a clean copy.
    pub fn fetch_sb(&mut self) -> Result<Vec<u8>, ClientError> {
        match self.call(Request::FetchSb)? {
            Reply::SensorBox(b) => Ok(b),
            r => Err(unexpected("FETCH_SB", &r)),
        }
    }

    /// `fetch_sb(node)`, parsed and validated.
    pub fn sensor_box(&mut self) -> Result<SensorBox, ClientError> {
        let bytes = self.fetch_sb()?;
        sensorbox::parse(&bytes, self.backdoor.0)
            .map_err(|e| ClientError::Protocol(format!("Sensor Box: {e}")))
    }

    /// Reads `len` bytes at `gpa`.
    pub fn read(&mut self, gpa: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        match self.call(Request::Read(Range { gpa, len }))? {
            Reply::Read(b) if b.len() == len as usize => Ok(b),
            Reply::Read(b) => Err(ClientError::Protocol(format!(
                "READ of {len} bytes returned {}",
                b.len()
            ))),
            r => Err(unexpected("READ", &r)),
        }
    }

    /// Reads many ranges in one round trip.
    pub fn read_batch(&mut self, ranges: &[(u64, u32)]) -> Result<Vec<Vec<u8>>, ClientError> {
        let req = ranges
            .iter()
            .map(|&(gpa, len)| Range { gpa, len })
            .collect();
        match self.call(Request::ReadBatch(req))? {
            Reply::ReadBatch(v)
                if v.len() == ranges.len()
                    && v.iter().zip(ranges).all(|(b, r)| b.len() == r.1 as usize) =>
            {
                Ok(v)
            }
            Reply::ReadBatch(_) => Err(ClientError::Protocol(
                "READ_BATCH reply does not match the request".into(),
            )),
            r => Err(unexpected("READ_BATCH", &r)),
        }
    }

    /// Writes `bytes` at `gpa` (returns once applied; with k-of-n agreement, once k agreed).
    pub fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), ClientError> {
        match self.call(Request::Write {
            gpa,
            bytes: bytes.to_vec(),
        })? {
            Reply::Write => Ok(()),
            r => Err(unexpected("WRITE", &r)),
        }
    }

    /// Takes (or renews) the pause lock; returns when every vCPU stopped, with how long that took.
    pub fn lock(&mut self, lease: Duration) -> Result<Duration, ClientError> {
        let lease_ms = u32::try_from(lease.as_millis()).unwrap_or(u32::MAX);
        match self.call(Request::Lock { lease_ms })? {
            Reply::Lock { lock_ns } => Ok(Duration::from_nanos(lock_ns)),
            r => Err(unexpected("LOCK", &r)),
        }
    }

    /// Releases the pause lock.
    pub fn unlock(&mut self) -> Result<(), ClientError> {
        match self.call(Request::Unlock)? {
            Reply::Unlock => Ok(()),
            r => Err(unexpected("UNLOCK", &r)),
        }
    }

    /// Whether the VM's vCPUs run (for hang detection: progress that stops while they run).
    pub fn status(&mut self) -> Result<wire::VmStatus, ClientError> {
        match self.call(Request::Status)? {
            Reply::Status(s) => Ok(s),
            r => Err(unexpected("STATUS", &r)),
        }
    }

    /// Exchanges RDMA endpoints (feature `verbs` on the bridge): sends the monitor's connect blob,
    /// returns the bridge's.
    pub fn rdma_connect(&mut self, blob: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        match self.call(Request::RdmaConnect(blob))? {
            Reply::RdmaConnect(b) => Ok(b),
            r => Err(unexpected("RDMA_CONNECT", &r)),
        }
    }

    /// Restarts the guest in place (the monitor needs `restart = true` in the bridge's config).
    pub fn restart(&mut self) -> Result<(), ClientError> {
        match self.call(Request::Restart)? {
            Reply::Restart => Ok(()),
            r => Err(unexpected("RESTART", &r)),
        }
    }

    /// One vCPU's registers.
    pub fn regs(&mut self, vcpu: u8) -> Result<Regs, ClientError> {
        match self.call(Request::Regs { vcpu })? {
            Reply::Regs(r) => Ok(r),
            r => Err(unexpected("REGS", &r)),
        }
    }
}

pub(crate) fn unexpected(op: &str, r: &Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply to {op}: {r:?}"))
}

/// Pages [`BridgeMem`] fetches per miss while paused (an aligned 32 KiB block).
pub const READ_AHEAD: u64 = 8;
/// Most pages [`BridgeMem`] keeps (64 MiB); the cache is emptied when full.
pub const MAX_CACHED_PAGES: usize = 16 << 10;

/// Moves guest-memory bytes between a monitor and a bridge. The TLS control channel ([`Bridge`])
/// and the RDMA verbs data path (`rdma_bridge::verbs::VerbsMonitor`) both implement it; everything
/// above (the page cache, introspection) works over either.
pub trait Transport {
    /// Reads `len` bytes at guest-physical `gpa`.
    fn read_mem(&mut self, gpa: u64, len: u32) -> Result<Vec<u8>, MemError>;
    /// Writes `bytes` at guest-physical `gpa`.
    fn write_mem(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemError>;

    /// What one [`Transport::read_batch_mem`] may carry, if the transport reads many ranges in
    /// one round trip; `None` (the default) if it has no such request.
    fn batch_limits(&self) -> Option<BatchLimits> {
        None
    }

    /// Reads every `(gpa, len)` of `ranges` (within [`Transport::batch_limits`]) in one round
    /// trip, the bytes of each in request order. The default reads them one by one.
    fn read_batch_mem(&mut self, ranges: &[(u64, u32)]) -> Result<Vec<Vec<u8>>, MemError> {
        ranges
            .iter()
            .map(|&(gpa, len)| self.read_mem(gpa, len))
            .collect()
    }
}

impl Transport for Bridge {
    fn read_mem(&mut self, gpa: u64, len: u32) -> Result<Vec<u8>, MemError> {
        self.read(gpa, len)
            .map_err(|e| remote(gpa, u64::from(len), e))
    }
    fn batch_limits(&self) -> Option<BatchLimits> {
        Some(BatchLimits::wire())
    }
    fn read_batch_mem(&mut self, ranges: &[(u64, u32)]) -> Result<Vec<Vec<u8>>, MemError> {
        self.read_batch(ranges).map_err(|e| {
            let (gpa, len) = ranges.first().copied().unwrap_or((0, 0));
            MemError::Remote(format!(
                "READ_BATCH of {} ranges from {gpa:#x}+{len:#x}: {e}",
                ranges.len()
            ))
        })
    }
    fn write_mem(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemError> {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        self.write(gpa, bytes).map_err(|e| remote(gpa, len, e))
    }
}

/// Any [`Transport`] as an [`introspect`] memory source, counting its round trips.
pub struct TransportMem<T> {
    t: RefCell<T>,
    round_trips: Cell<u64>,
}

impl<T: Transport> TransportMem<T> {
    /// Wraps a transport.
    pub fn new(t: T) -> Self {
        TransportMem {
            t: RefCell::new(t),
            round_trips: Cell::new(0),
        }
    }

    /// The transport, for other calls.
    pub fn transport(&self) -> RefMut<'_, T> {
        self.t.borrow_mut()
    }

    /// Gives the transport back.
    pub fn into_inner(self) -> T {
        self.t.into_inner()
    }

    /// Round trips for reads made so far (one per read, one per batch of reads).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.get()
    }
}

impl<T: Transport> PhysMem for TransportMem<T> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        if buf.is_empty() {
            return Ok(());
        }
        let oor = || MemError::OutOfRange {
            gpa,
            len: u64::try_from(buf.len()).unwrap_or(u64::MAX),
        };
        let n = u32::try_from(buf.len()).map_err(|_| oor())?;
        self.round_trips.set(self.round_trips.get() + 1);
        let b = self.t.borrow_mut().read_mem(gpa, n)?;
        if b.len() != buf.len() {
            return Err(MemError::Remote(format!(
                "{gpa:#x}+{n:#x}: the bridge sent {} bytes",
                b.len()
            )));
        }
        buf.copy_from_slice(&b);
        Ok(())
    }

    /// With a transport that batches, one round trip per batch its limits allow (see
    /// [`crate::batch::plan`]); a range that cannot share a batch is one plain read.
    fn read_many(&self, ranges: &mut [(u64, &mut [u8])]) -> Result<(), MemError> {
        let Some(limits) = self.t.borrow().batch_limits() else {
            for (gpa, buf) in ranges.iter_mut() {
                self.read(*gpa, buf)?;
            }
            return Ok(());
        };
        let mut wanted: Vec<(usize, u64, u32)> = Vec::with_capacity(ranges.len());
        for (i, (gpa, buf)) in ranges.iter().enumerate() {
            if buf.is_empty() {
                continue;
            }
            let len = u32::try_from(buf.len()).map_err(|_| MemError::OutOfRange {
                gpa: *gpa,
                len: u64::try_from(buf.len()).unwrap_or(u64::MAX),
            })?;
            wanted.push((i, *gpa, len));
        }
        let lens: Vec<u32> = wanted.iter().map(|w| w.2).collect();
        for group in batch::plan(&lens, &limits) {
            let Some(part) = wanted.get(group) else {
                continue;
            };
            if let [(i, gpa, _)] = part {
                if let Some((_, buf)) = ranges.get_mut(*i) {
                    self.read(*gpa, buf)?;
                }
                continue;
            }
            let request: Vec<(u64, u32)> = part.iter().map(|&(_, gpa, len)| (gpa, len)).collect();
            self.round_trips.set(self.round_trips.get() + 1);
            let got = self.t.borrow_mut().read_batch_mem(&request)?;
            if got.len() != part.len() {
                return Err(MemError::Remote(format!(
                    "a batch of {} reads got {} answers",
                    part.len(),
                    got.len()
                )));
            }
            for (&(i, gpa, len), bytes) in part.iter().zip(&got) {
                match ranges.get_mut(i) {
                    Some((_, buf)) if buf.len() == bytes.len() => buf.copy_from_slice(bytes),
                    _ => {
                        return Err(MemError::Remote(format!(
                            "{gpa:#x}+{len:#x}: the batch sent {} bytes",
                            bytes.len()
                        )))
                    }
                }
            }
        }
        Ok(())
    }

    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), MemError> {
        self.t.borrow_mut().write_mem(gpa, bytes)
    }
}

/// Guest memory through a bridge session, as an [`introspect`] memory source.
///
/// While the guest is paused ([`BridgeMem::lock`] or [`BridgeMem::pauser`]), reads go through a
/// page cache ([`CachedMem`]) that fetches aligned 32 KiB blocks ([`READ_AHEAD`] pages, one READ)
/// and keeps them, so a task-list walk costs one round trip per new block rather than one per
/// field. Outside a pause nothing is cached: the guest changes its memory. [`PhysMem::read_many`]
/// sends many ranges as one READ_BATCH (more if the wire's limits call for it); while paused,
/// ranges the cache holds come from it and the rest go exactly as asked, and are not kept.
pub struct BridgeMem {
    mem: CachedMem<TransportMem<Bridge>>,
}

impl BridgeMem {
    /// Wraps a session.
    pub fn new(bridge: Bridge) -> BridgeMem {
        BridgeMem {
            mem: CachedMem::new(TransportMem::new(bridge), READ_AHEAD, MAX_CACHED_PAGES),
        }
    }

    /// The session, for other calls.
    pub fn bridge(&self) -> RefMut<'_, Bridge> {
        self.mem.inner().transport()
    }

    /// Gives the session back.
    pub fn into_inner(self) -> Bridge {
        self.mem.into_inner().into_inner()
    }

    /// Round trips for reads made so far (a READ or a READ_BATCH each).
    pub fn round_trips(&self) -> u64 {
        self.mem.inner().round_trips()
    }

    fn set_caching(&self, on: bool) {
        self.mem.set_caching(on);
    }

    /// Takes the pause lock; until [`BridgeMem::unlock`], pages read are cached (the guest cannot
    /// change them). Returns how long the vCPUs took to stop.
    pub fn lock(&self, lease: Duration) -> Result<Duration, ClientError> {
        let took = self.bridge().lock(lease)?;
        self.set_caching(true);
        Ok(took)
    }

    /// Releases the pause lock and drops the cache.
    pub fn unlock(&self) -> Result<(), ClientError> {
        self.set_caching(false);
        self.bridge().unlock()
    }

    /// The bridge's pause lock as a [`Pausable`]; while held, pages are cached.
    pub fn pauser(&self, lease: Duration) -> RemotePauser<'_> {
        RemotePauser {
            mem: self,
            lease,
            last_lock: Duration::ZERO,
        }
    }

    /// Locates the kernel (paused) and reads the process table at a quiescent moment, all over the
    /// bridge. `files` is `None` for a patched guest (the Sensor Box describes the kernel).
    pub fn process_table(
        &self,
        files: Option<KernelFiles<'_>>,
    ) -> Result<Locked<Vec<Process>>, InspectError> {
        self.process_table_within(files, Limits::default())
    }

    /// [`BridgeMem::process_table`] with the walk bounded by `limits`; the lease covers the walk
    /// (`limits.max_time` plus a second, at least [`DEFAULT_LEASE`]).
    pub fn process_table_within(
        &self,
        files: Option<KernelFiles<'_>>,
        limits: Limits,
    ) -> Result<Locked<Vec<Process>>, InspectError> {
        let target = self.locate(files)?;
        let lease = DEFAULT_LEASE.max(limits.max_time + Duration::from_secs(1));
        target.process_table_within(
            self,
            &mut self.pauser(lease),
            Duration::from_millis(500),
            limits,
        )
    }

    /// The guest's Sensor Box (`FETCH_SB`) or, on a stock guest, which has none, its virtual
    /// sensors computed from its kernel's counters (the kernel found in its memory: the lock is
    /// taken only to read CR3).
    pub fn sensors(&self) -> Result<SensorBox, InspectError> {
        let (gpa, size) = self.bridge().backdoor();
        match (KernelFiles::Auto { gpa, size }).resolve(self) {
            KernelFiles::Memory => {
                let mut p = self.pauser(Duration::from_secs(10));
                introspect::virtual_sensors::sample_discovered(self, &mut p, |_| {
                    let r = self.bridge().regs(0)?;
                    Ok::<_, InspectError>((r.cr3, r.cr4))
                })
            }
            _ => Ok(self.bridge().sensor_box()?),
        }
    }

    /// Finds the guest kernel (its location does not change while it runs; see
    /// [`Target::locate_paused`]): a stock kernel's files are read and parsed first, with the
    /// guest running, and the pause covers the memory reads only. A caller that locates more than
    /// once loads a [`introspect::target::StockKernel`] once and passes [`KernelFiles::Stock`].
    pub fn locate(&self, files: Option<KernelFiles<'_>>) -> Result<Target, InspectError> {
        let (gpa, size) = self.bridge().backdoor();
        let files = files.unwrap_or(KernelFiles::Auto { gpa, size });
        let mut p = self.pauser(Duration::from_secs(10));
        Target::locate_paused(
            self,
            &mut p,
            |_| {
                let r = self.bridge().regs(0)?;
                Ok::<_, InspectError>((r.cr3, r.cr4))
            },
            files,
        )
    }
}

fn remote(gpa: u64, len: u64, e: ClientError) -> MemError {
    match e.code() {
        Some(wire::code::OUT_OF_RANGE) => MemError::OutOfRange { gpa, len },
        _ => MemError::Remote(format!("{gpa:#x}+{len:#x}: {e}")),
    }
}

impl PhysMem for BridgeMem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.mem.read(gpa, buf)
    }

    fn read_many(&self, ranges: &mut [(u64, &mut [u8])]) -> Result<(), MemError> {
        self.mem.read_many(ranges)
    }

    fn read_fresh(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.mem.read_fresh(gpa, buf)
    }

    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), MemError> {
        self.mem.write(gpa, bytes)
    }
}

/// The bridge's LOCK/UNLOCK as the project's [`Pausable`] (the lock, above the bridge, is bdvmm's
/// pause below it).
pub struct RemotePauser<'a> {
    mem: &'a BridgeMem,
    lease: Duration,
    last_lock: Duration,
}

impl RemotePauser<'_> {
    /// How long the vCPUs took to stop at the last pause.
    pub fn last_lock(&self) -> Duration {
        self.last_lock
    }
}

impl Pausable for RemotePauser<'_> {
    type Error = ClientError;
    fn pause(&mut self) -> Result<(), ClientError> {
        self.last_lock = self.mem.lock(self.lease)?;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), ClientError> {
        self.mem.unlock()
    }
}
