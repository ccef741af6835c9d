//! The RDMA verbs transport of the bridge (cargo feature `verbs`).
//!
//! # Design
//!
//! The bridge speaks two channels to a monitor. The TCP (TLS) **control channel** ([`crate::wire`])
//! authenticates the monitor, takes and releases the pause lock (LOCK/UNLOCK) and negotiates the verbs
//! connection; the **data path** is one-sided RDMA: the monitor's NIC reads and writes guest memory
//! without any bridge or guest CPU being involved, which is the point of the paper's backdoor.
//!
//! ```text
//!  monitor (VerbsMonitor)                         target (VerbsTarget, inside the bridge)
//!  open(), local_endpoint() ──── RDMA_CONNECT(blob: monitor endpoint, 0 regions) ───►
//!                                                 accept(monitor endpoint): new RC QP, INIT→RTR→RTS
//!  connect(target endpoint, ◄─── RDMA_CONNECT ok(blob: target endpoint, region table) ──
//!          region table): INIT→RTR→RTS
//!  read(gpa, len) ═══════════ one-sided RDMA READ (rkey of a RemoteRead region) ══════► guest RAM
//!  write(gpa, bytes) ════════ one-sided RDMA WRITE (rkey of a RemoteWrite region) ════► repair hook
//! ```
//!
//! The blob is [`encode_connect`]'s byte format (below); it travels as the opaque payload of the
//! control channel's `RDMA_CONNECT` frame.
//!
//! **Target side.** Guest memory is a host mapping of the memfd that bdvmm owns. Each guest-physical
//! range a monitor may read is registered *directly on that mapping* (zero copy, no bounce buffer on
//! the target) as a memory region whose only remote right is REMOTE_READ; each repair-hook range a
//! monitor may write is registered with REMOTE_WRITE only (verbs require LOCAL_WRITE with it). Nothing
//! is registered with REMOTE_ATOMIC. The queue pair created for a monitor gets only the remote rights
//! that some region grants, so a target without write regions cannot be written at all. The NIC
//! enforces the rest: an RDMA READ with the rkey of a write-only region, or outside a region, fails
//! at the target's NIC with a remote access error and the monitor's QP goes to the error state.
//!
//! **Monitor side.** The monitor checks every access against the region table *before* touching the
//! wire: `[gpa, gpa + len)` must lie inside one region with the right access, else the call fails
//! with [`VerbsError::OutOfRegion`] and nothing is posted. Data moves through one local bounce buffer
//! ([`BOUNCE_LEN`], registered with LOCAL_WRITE only: the target has no right on monitor memory);
//! larger transfers are split into chunks. Every work request is signalled and the completion queue
//! is polled with a deadline ([`DEFAULT_OP_TIMEOUT`], see [`VerbsMonitor::set_timeout`]): a call never
//! hangs. After a timeout or a failed completion the monitor's QP is moved to the error state and the
//! monitor is *broken*: every later call fails with [`VerbsError::Broken`] and the caller reconnects
//! with a new [`VerbsMonitor`] over the control channel.
//!
//! # Why raw `ibverbs-sys` calls and not the `ibverbs` crate's safe API
//!
//! The `ibverbs` crate (0.9) is used for device discovery ([`devices_available`]) and its
//! [`ibverbs::QueuePairEndpoint`] converts to and from [`Endpoint`]. Its safe API cannot serve the data
//! path: `ProtectionDomain::allocate` registers only a `Vec` it allocates itself, always with
//! LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ | REMOTE_ATOMIC (both wrong for us: we need zero-copy
//! registration of the guest mapping, and least privilege); `QueuePair` posts only SEND/RECV, not
//! RDMA READ/WRITE; the raw `ibv_context`/`ibv_pd`/`ibv_qp` handles are private, so the two cannot be
//! mixed; and its `Drop` impls panic when the device reports an error. The crate does not re-export
//! its FFI module, so this module calls `ibverbs-sys` (the same version the crate links, so nothing
//! extra is built) through small RAII wrappers (device context, PD, CQ, QP, MR) that never
//! panic, with a `// SAFETY:` note on every `unsafe` block. `ibv_post_send` and `ibv_poll_cq` are
//! `static inline` in `verbs.h` (not exported symbols); like the crate, we call the provider's
//! function pointers in `ibv_context.ops`.
//!
//! Registration of foreign memory is why [`VerbsTarget::register`] is an `unsafe fn`: the caller
//! promises that the ranges stay mapped while the target lives and that nothing in the process holds
//! Rust references into them (the guest and the remote monitors change them behind the compiler's
//! back, exactly like the guest already does; bdvmm treats guest memory as volatile).
//!
//! # Connect blob (version 1)
//!
//! All integers are little-endian. At most [`MAX_CONNECT_LEN`] (4096) bytes; the largest legal blob
//! (64 regions with 32-byte names) is 4004 bytes. Decoding is total: any byte string gives a result
//! or a [`VerbsError`], and [`encode_connect`] refuses what [`decode_connect`] would reject.
//!
//! | offset | size | field         | meaning                                                         |
//! |-------:|-----:|---------------|-----------------------------------------------------------------|
//! | 0      | 4    | `magic`       | the bytes `"BDRV"`                                              |
//! | 4      | 1    | `version`     | [`CONNECT_VERSION`] (1); anything else is rejected              |
//! | 5      | 1    | `flags`       | bit 0: `gid` is present; other bits must be 0                   |
//! | 6      | 1    | `mtu`         | the sender's port MTU as `ibv_mtu`: 1=256, 2=512, 3=1024, 4=2048, 5=4096 |
//! | 7      | 1    | `count`       | number of region records that follow, 0..=[`MAX_REGIONS`] (64) |
//! | 8      | 4    | `qp_num`      | the sender's RC queue pair number, 2..2^24 (0 and 1 are special QPs) |
//! | 12     | 4    | `psn`         | the sender's initial packet sequence number, < 2^24             |
//! | 16     | 2    | `lid`         | the sender's port LID (InfiniBand); may be 0 only with a `gid`  |
//! | 18     | 2    | reserved      | must be 0                                                       |
//! | 20     | 16   | `gid`         | the sender's GID in network byte order (RoCE); all 0 when bit 0 of `flags` is clear |
//! | 36     | …    | regions       | `count` region records                                          |
//!
//! Region record (30 bytes + name):
//!
//! | offset | size | field         | meaning                                                         |
//! |-------:|-----:|---------------|-----------------------------------------------------------------|
//! | 0      | 1    | `access`      | 1 = [`Access::RemoteRead`], 2 = [`Access::RemoteWrite`]         |
//! | 1      | 1    | `name_len`    | 1..=[`MAX_NAME_LEN`] (32)                                       |
//! | 2      | 4    | `rkey`        | the memory region's remote key                                  |
//! | 6      | 8    | `gpa`         | guest-physical start of the range                               |
//! | 14     | 8    | `len`         | length in bytes, > 0; `gpa + len` must not overflow            |
//! | 22     | 8    | `remote_addr` | the target virtual address that maps `gpa`; `remote_addr + len` must not overflow |
//! | 30     | n    | `name`        | `name_len` bytes of printable ASCII (`!`..=`~`), unique in the blob |
//!
//! Nothing may follow the last record. A monitor sends its endpoint with `count` = 0; the target
//! answers with its endpoint and the region table. Ranges of different regions may overlap (a hook
//! inside a readable structure is legitimate); the monitor uses the first region that contains an
//! access and grants it.
//!
//! # Host requirements
//!
//! `ibverbs-sys` builds rdma-core with cmake and generates bindings with bindgen (libclang), and the
//! binary links the system `libibverbs` (Debian: `cmake pkg-config libibverbs-dev libnl-3-dev
//! libnl-route-3-dev libclang-dev`, see `scripts/install-deps.sh`). At run time an RDMA device is needed
//! (a NIC, or SoftRoCE: `rdma link add rxe0 type rxe netdev eth0`); without one, [`VerbsTarget::open`]
//! and [`VerbsMonitor::open`] return [`VerbsError::NoDevice`] and the TCP transport is the fallback.
//! Registration pins memory: the process needs a large enough `ulimit -l` (RLIMIT_MEMLOCK) or
//! CAP_IPC_LOCK. Port 1 of the device is used. Register `MAP_SHARED` mappings (the memfd): a
//! read-only registration of a private (copy-on-write) mapping can pin pages the process later
//! replaces. bdvmm starts its helpers with `std::process::Command` (fork + exec), so `ibv_fork_init`
//! is not needed.

use std::collections::hash_map::RandomState;
use std::ffi::CStr;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::ptr::{self, NonNull};
use std::time::{Duration, Instant};

use ibverbs_sys as ffi;
use thiserror::Error;

/// The four magic bytes at the start of a connect blob.
pub const CONNECT_MAGIC: [u8; 4] = *b"BDRV";
/// The connect blob version this module writes and accepts.
pub const CONNECT_VERSION: u8 = 1;
/// Largest connect blob accepted (it travels in one control-channel frame).
pub const MAX_CONNECT_LEN: usize = 4096;
/// Most regions in one connect blob, and most regions one [`VerbsTarget`] registers.
pub const MAX_REGIONS: usize = 64;
/// Longest region name, in bytes.
pub const MAX_NAME_LEN: usize = 32;
/// Size of the fixed part of a connect blob.
pub const CONNECT_HEADER_LEN: usize = 36;
/// Size of the fixed part of one region record.
pub const REGION_RECORD_LEN: usize = 30;
/// Most monitors (queue pairs) one [`VerbsTarget`] serves at a time.
pub const MAX_MONITORS: usize = 64;
/// Size of the monitor's registered bounce buffer; larger transfers are split into chunks of this.
pub const BOUNCE_LEN: usize = 1 << 20;
/// Largest single [`VerbsMonitor::read`] or [`VerbsMonitor::write`].
pub const MAX_TRANSFER: usize = 64 << 20;
/// How long a monitor waits for one work completion before it gives up.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(5);

/// The device port used (verbs ports are numbered from 1).
const PORT_NUM: u8 = 1;
/// Connect-blob flag: the endpoint carries a GID.
const FLAG_GID: u8 = 0x01;
/// Queue pair and packet sequence numbers are 24-bit.
const QPN_LIMIT: u32 = 1 << 24;
/// Transport timeout exponent of our RC QPs: 4.096 µs × 2^14 ≈ 67 ms per try.
const QP_TIMEOUT: u8 = 14;
/// Retries of a lost packet (3 bits); with [`QP_TIMEOUT`] a dead peer is reported in about 0.5 s.
const QP_RETRY_CNT: u8 = 7;
/// RNR retries; RNR NAKs only concern SENDs, which this transport never uses.
const QP_RNR_RETRY: u8 = 7;
/// Minimum RNR NAK timer (12 = 0.64 ms); unused in practice, see [`QP_RNR_RETRY`].
const QP_MIN_RNR_TIMER: u8 = 12;
/// Upper bound of the RDMA READs a target QP answers concurrently (capped by the device).
const TARGET_MAX_DEST_RD_ATOMIC: u8 = 16;
/// Completions polled at once.
const POLL_BATCH: usize = 4;
/// Polls spun before the wait loop starts sleeping between polls.
const SPIN_POLLS: u32 = 2_000;
/// Sleep between polls once spinning is over.
const POLL_SLEEP: Duration = Duration::from_micros(20);

/// Errors of the verbs transport. Each message says what to do about it.
#[derive(Debug, Error)]
pub enum VerbsError {
    /// There is no RDMA device on this host.
    #[error(
        "no RDMA device found (ibverbs::devices() found none): this host has no RDMA NIC or no RDMA \
         kernel support; use the TCP transport, or create a SoftRoCE device \
         (`rdma link add rxe0 type rxe netdev <netdev>`)"
    )]
    NoDevice,
    /// Listing the RDMA devices failed.
    #[error(
        "cannot list RDMA devices: {0}; check that the ib_uverbs kernel module is loaded and that \
         /dev/infiniband is accessible to this user"
    )]
    DeviceList(#[source] io::Error),
    /// The named device does not exist.
    #[error("RDMA device {name:?} not found; available devices: {available}")]
    DeviceNotFound {
        /// The name asked for.
        name: String,
        /// The names found, comma-separated.
        available: String,
    },
    /// Port 1 of the device is not usable.
    #[error(
        "port {port} of RDMA device {device} is not active (state {state}); check the cable/link, \
         the subnet manager (InfiniBand) or the netdev (RoCE) with `ibv_devinfo`"
    )]
    PortNotActive {
        /// Device name.
        device: String,
        /// Port number.
        port: u8,
        /// `ibv_port_state` value.
        state: u32,
    },
    /// A RoCE port has no GID to route with.
    #[error(
        "RDMA device {device} (Ethernet link layer) has no usable GID on port {port}; give its \
         netdev an IP address"
    )]
    NoGid {
        /// Device name.
        device: String,
        /// Port number.
        port: u8,
    },
    /// A verbs call failed.
    #[error("{verb} failed: {source}; {hint}")]
    Verb {
        /// The verb that failed.
        verb: &'static str,
        /// The error it reported.
        #[source]
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },

    /// The connect blob is longer than [`MAX_CONNECT_LEN`].
    #[error(
        "connect blob of {len} bytes exceeds {MAX_CONNECT_LEN}: the peer is broken or hostile; \
         close the connection"
    )]
    ConnectTooLong {
        /// Its length.
        len: usize,
    },
    /// The connect blob ends too early.
    #[error(
        "connect blob truncated: {what} needs bytes {offset}..{end} but the blob has {len}; the \
         peer is broken or hostile, close the connection"
    )]
    ConnectTruncated {
        /// The field being read.
        what: &'static str,
        /// Its first byte.
        offset: usize,
        /// One past its last byte.
        end: usize,
        /// The blob's length.
        len: usize,
    },
    /// The blob does not start with [`CONNECT_MAGIC`].
    #[error(
        "connect blob has bad magic {found:02x?} (expected \"BDRV\"): the peer does not speak \
         this protocol"
    )]
    ConnectMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// Unknown blob version.
    #[error(
        "connect blob version {version} is not supported (this build speaks {CONNECT_VERSION}); \
         upgrade the older side"
    )]
    ConnectVersion {
        /// The version found.
        version: u8,
    },
    /// Unknown flag bits or non-zero reserved bytes.
    #[error(
        "connect blob has unknown flags {flags:#04x} or non-zero reserved bytes; upgrade the older \
         side"
    )]
    ConnectReserved {
        /// The flags byte.
        flags: u8,
    },
    /// Bytes follow the last region record.
    #[error("connect blob has {count} bytes after its last region; the peer is broken or hostile")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// The endpoint cannot be connected to.
    #[error("invalid RDMA endpoint: {reason}; the peer is broken or hostile")]
    BadEndpoint {
        /// What is wrong.
        reason: &'static str,
    },
    /// More than [`MAX_REGIONS`] regions.
    #[error("{count} regions exceed the limit of {MAX_REGIONS}; expose fewer, larger ranges")]
    TooManyRegions {
        /// How many were given.
        count: usize,
    },
    /// A region name is empty, too long or not printable ASCII.
    #[error(
        "region name {name:?} is invalid: names are 1..={MAX_NAME_LEN} bytes of printable ASCII \
         without spaces"
    )]
    BadName {
        /// The name (lossily decoded).
        name: String,
    },
    /// Two regions have the same name.
    #[error("region name {name:?} is used twice; give every region its own name")]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// Unknown access byte.
    #[error("region access byte {byte} is invalid (1 = remote read, 2 = remote write)")]
    BadAccess {
        /// The byte.
        byte: u8,
    },
    /// A region has length 0.
    #[error("region {name:?} is empty; give it a length > 0")]
    EmptyRegion {
        /// The region.
        name: String,
    },
    /// `start + len` overflows.
    #[error("region {name:?}: {what} {start:#x} + length {len:#x} overflows 64 bits")]
    RegionOverflow {
        /// The region.
        name: String,
        /// Which address overflows (`gpa`, `remote_addr` or `host address`).
        what: &'static str,
        /// The start.
        start: u64,
        /// The length.
        len: u64,
    },
    /// A region is larger than the device can register.
    #[error(
        "region {name:?} of {len} bytes exceeds the device's max_mr_size {max}; split it into \
         smaller ranges"
    )]
    RegionTooLarge {
        /// The region.
        name: String,
        /// Its length.
        len: u64,
        /// The device limit.
        max: u64,
    },
    /// Registering a region failed.
    #[error(
        "registering region {name:?} ({len} bytes) failed: {source}; if this is ENOMEM raise \
         `ulimit -l` (RLIMIT_MEMLOCK) or give the process CAP_IPC_LOCK, if EFAULT the host range is \
         not mapped"
    )]
    Register {
        /// The region.
        name: String,
        /// Its length.
        len: usize,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `register` was called after a monitor connected.
    #[error(
        "regions must all be registered before the first monitor is accepted (connected queue \
         pairs keep the rights they were created with); register first, then accept"
    )]
    RegisterAfterAccept,
    /// `accept` was called without any region.
    #[error(
        "no region is registered: register the ranges monitors may access before accepting one"
    )]
    NoRegions,
    /// Too many monitors connected.
    #[error("{MAX_MONITORS} monitors are already connected; release one before accepting another")]
    TooManyMonitors,

    /// `read`/`write` before `connect`.
    #[error(
        "the monitor is not connected: call connect() with the target's endpoint and regions first"
    )]
    NotConnected,
    /// `connect` called twice.
    #[error("the monitor is already connected; open a new VerbsMonitor to connect again")]
    AlreadyConnected,
    /// The access is outside every region that grants it.
    #[error(
        "{access:?} of {len} bytes at gpa {gpa:#x} is outside every region that grants it; nothing \
         was sent (check the region table from the bridge)"
    )]
    OutOfRegion {
        /// The access asked for.
        access: Access,
        /// Start of the access.
        gpa: u64,
        /// Its length.
        len: usize,
    },
    /// The transfer is larger than [`MAX_TRANSFER`].
    #[error("transfer of {len} bytes exceeds {MAX_TRANSFER}; split it")]
    TransferTooLarge {
        /// Its length.
        len: usize,
    },
    /// No completion arrived in time.
    #[error(
        "RDMA {op} got no completion within {after:?}; the target is unreachable or stuck. The \
         monitor is now broken: reconnect over the control channel"
    )]
    Timeout {
        /// `READ` or `WRITE`.
        op: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// The work request completed with an error.
    #[error(
        "RDMA {op} failed: {status} (status {code}, vendor error {vendor_err:#x}); {hint}. The \
         monitor is now broken: reconnect over the control channel"
    )]
    Completion {
        /// `READ` or `WRITE`.
        op: &'static str,
        /// The status text from libibverbs.
        status: String,
        /// The `ibv_wc_status` value.
        code: u32,
        /// The vendor syndrome.
        vendor_err: u32,
        /// What it usually means.
        hint: &'static str,
    },
    /// An earlier failure broke the queue pair.
    #[error("the RDMA connection is broken ({reason}); open a new VerbsMonitor and reconnect")]
    Broken {
        /// The first failure.
        reason: String,
    },
}

/// What a region lets a remote monitor do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// One-sided RDMA READ (Sensor Box, externalized state).
    RemoteRead,
    /// One-sided RDMA WRITE (repair hooks).
    RemoteWrite,
}

impl Access {
    fn to_byte(self) -> u8 {
        match self {
            Access::RemoteRead => 1,
            Access::RemoteWrite => 2,
        }
    }

    fn from_byte(byte: u8) -> Result<Self, VerbsError> {
        match byte {
            1 => Ok(Access::RemoteRead),
            2 => Ok(Access::RemoteWrite),
            byte => Err(VerbsError::BadAccess { byte }),
        }
    }

    /// The memory-region access flags: the one remote right, plus LOCAL_WRITE which verbs require
    /// with REMOTE_WRITE (local read is always implied).
    fn mr_flags(self) -> ffi::ibv_access_flags {
        match self {
            Access::RemoteRead => ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ,
            Access::RemoteWrite => {
                ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                    | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            }
        }
    }

    /// The queue-pair access flag for this right.
    fn qp_flags(self) -> ffi::ibv_access_flags {
        match self {
            Access::RemoteRead => ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ,
            Access::RemoteWrite => ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE,
        }
    }
}

/// A guest-physical range to expose, as the target's host mapping of it.
#[derive(Debug, Clone)]
pub struct RegionSpec {
    /// Name shown to monitors (1..=32 bytes of printable ASCII, unique).
    pub name: String,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Host address of the first byte, inside the caller's mapping of the guest-memory memfd.
    pub host: NonNull<u8>,
    /// Length in bytes.
    pub len: usize,
    /// The one remote right monitors get.
    pub access: Access,
}

/// A registered region, as monitors see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region name.
    pub name: String,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Target virtual address of the first byte (what RDMA work requests address).
    pub remote_addr: u64,
    /// Remote key of the memory region.
    pub rkey: u32,
    /// The right it grants.
    pub access: Access,
}

impl RegionInfo {
    fn validate(&self) -> Result<(), VerbsError> {
        validate_name(self.name.as_bytes())?;
        if self.len == 0 {
            return Err(VerbsError::EmptyRegion {
                name: self.name.clone(),
            });
        }
        check_end(&self.name, "gpa", self.gpa, self.len)?;
        check_end(&self.name, "remote_addr", self.remote_addr, self.len)?;
        Ok(())
    }

    /// The target address of `[gpa, gpa + len)` if this region contains it and grants `access`.
    fn translate(&self, access: Access, gpa: u64, len: u64) -> Option<u64> {
        if self.access != access || gpa < self.gpa {
            return None;
        }
        let offset = gpa - self.gpa;
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        self.remote_addr.checked_add(offset)
    }
}

/// What the two sides exchange to connect an RC queue pair: [`ibverbs::QueuePairEndpoint`] plus the
/// initial packet sequence number and the port MTU, which the crate fixes at 0 and the local MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Queue pair number (24 bits, ≥ 2).
    pub qp_num: u32,
    /// Initial packet sequence number of the sender's send queue (24 bits).
    pub psn: u32,
    /// Port LID (InfiniBand); 0 on RoCE.
    pub lid: u16,
    /// Port MTU as `ibv_mtu` (1 = 256 … 5 = 4096); the connection uses the smaller of both sides'.
    pub mtu: u8,
    /// Port GID in network byte order, present on RoCE (and for routed InfiniBand).
    pub gid: Option<[u8; 16]>,
}

impl Endpoint {
    /// Checks the fields a peer could get wrong.
    pub fn validate(&self) -> Result<(), VerbsError> {
        let bad = |reason| Err(VerbsError::BadEndpoint { reason });
        if self.qp_num < 2 || self.qp_num >= QPN_LIMIT {
            return bad("qp_num must be in 2..2^24");
        }
        if self.psn >= QPN_LIMIT {
            return bad("psn must be below 2^24");
        }
        if !(1..=5).contains(&self.mtu) {
            return bad("mtu must be 1..=5 (256..=4096 bytes)");
        }
        match self.gid {
            None if self.lid == 0 => bad("neither a LID nor a GID: the endpoint is not routable"),
            Some(gid) if gid == [0; 16] => bad("the GID is all zeroes"),
            _ => Ok(()),
        }
    }
}

impl From<Endpoint> for ibverbs::QueuePairEndpoint {
    /// Drops `psn` and `mtu`, which the crate's handshake fixes at 0 and the local port MTU.
    fn from(e: Endpoint) -> Self {
        ibverbs::QueuePairEndpoint {
            num: e.qp_num,
            lid: e.lid,
            gid: e.gid.map(|raw| ibverbs::Gid::from(ffi::ibv_gid { raw })),
        }
    }
}

impl From<ibverbs::QueuePairEndpoint> for Endpoint {
    /// Uses what the crate's handshake assumes: PSN 0, and MTU 1024 (valid on every port).
    fn from(e: ibverbs::QueuePairEndpoint) -> Self {
        let gid = e.gid.map(|g| {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&g.subnet_prefix().to_be_bytes());
            raw[8..].copy_from_slice(&g.interface_id().to_be_bytes());
            raw
        });
        Endpoint {
            qp_num: e.num,
            psn: 0,
            lid: e.lid,
            mtu: ffi::IBV_MTU_1024 as u8,
            gid,
        }
    }
}

fn validate_name(name: &[u8]) -> Result<(), VerbsError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.iter().all(u8::is_ascii_graphic) {
        return Err(VerbsError::BadName {
            name: String::from_utf8_lossy(&name[..name.len().min(64)]).into_owned(),
        });
    }
    Ok(())
}

fn check_end(name: &str, what: &'static str, start: u64, len: u64) -> Result<u64, VerbsError> {
    start
        .checked_add(len)
        .ok_or_else(|| VerbsError::RegionOverflow {
            name: name.to_owned(),
            what,
            start,
            len,
        })
}

fn validate_regions(regions: &[RegionInfo]) -> Result<(), VerbsError> {
    if regions.len() > MAX_REGIONS {
        return Err(VerbsError::TooManyRegions {
            count: regions.len(),
        });
    }
    for (i, r) in regions.iter().enumerate() {
        r.validate()?;
        if regions[..i].iter().any(|o| o.name == r.name) {
            return Err(VerbsError::DuplicateName {
                name: r.name.clone(),
            });
        }
    }
    Ok(())
}

/// Encodes an endpoint and a region table as a connect blob (format in the module docs).
///
/// Refuses (with the decoder's error) anything [`decode_connect`] would reject.
pub fn encode_connect(endpoint: &Endpoint, regions: &[RegionInfo]) -> Result<Vec<u8>, VerbsError> {
    endpoint.validate()?;
    validate_regions(regions)?;
    let mut out =
        Vec::with_capacity(CONNECT_HEADER_LEN + regions.len() * (REGION_RECORD_LEN + MAX_NAME_LEN));
    out.extend_from_slice(&CONNECT_MAGIC);
    out.push(CONNECT_VERSION);
    out.push(if endpoint.gid.is_some() { FLAG_GID } else { 0 });
    out.push(endpoint.mtu);
    // validate_regions bounds the count by MAX_REGIONS (64).
    out.push(regions.len() as u8);
    out.extend_from_slice(&endpoint.qp_num.to_le_bytes());
    out.extend_from_slice(&endpoint.psn.to_le_bytes());
    out.extend_from_slice(&endpoint.lid.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&endpoint.gid.unwrap_or([0; 16]));
    for r in regions {
        out.push(r.access.to_byte());
        // validate_name bounds the length by MAX_NAME_LEN (32).
        out.push(r.name.len() as u8);
        out.extend_from_slice(&r.rkey.to_le_bytes());
        out.extend_from_slice(&r.gpa.to_le_bytes());
        out.extend_from_slice(&r.len.to_le_bytes());
        out.extend_from_slice(&r.remote_addr.to_le_bytes());
        out.extend_from_slice(r.name.as_bytes());
    }
    debug_assert!(out.len() <= MAX_CONNECT_LEN);
    Ok(out)
}

/// A bounds-checked little-endian reader over a connect blob.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], VerbsError> {
        let end = self.pos.saturating_add(n);
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or(VerbsError::ConnectTruncated {
                what,
                offset: self.pos,
                end,
                len: self.bytes.len(),
            })?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], VerbsError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(what, N)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, VerbsError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, VerbsError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, VerbsError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, VerbsError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
}

/// Decodes a connect blob (format in the module docs), validating every field.
pub fn decode_connect(bytes: &[u8]) -> Result<(Endpoint, Vec<RegionInfo>), VerbsError> {
    if bytes.len() > MAX_CONNECT_LEN {
        return Err(VerbsError::ConnectTooLong { len: bytes.len() });
    }
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.array::<4>("magic")?;
    if magic != CONNECT_MAGIC {
        return Err(VerbsError::ConnectMagic { found: magic });
    }
    let version = r.u8("version")?;
    if version != CONNECT_VERSION {
        return Err(VerbsError::ConnectVersion { version });
    }
    let flags = r.u8("flags")?;
    let mtu = r.u8("mtu")?;
    let count = usize::from(r.u8("region count")?);
    let qp_num = r.u32("qp_num")?;
    let psn = r.u32("psn")?;
    let lid = r.u16("lid")?;
    let reserved = r.u16("reserved")?;
    let gid = r.array::<16>("gid")?;
    if flags & !FLAG_GID != 0 || reserved != 0 || (flags & FLAG_GID == 0 && gid != [0; 16]) {
        return Err(VerbsError::ConnectReserved { flags });
    }
    let endpoint = Endpoint {
        qp_num,
        psn,
        lid,
        mtu,
        gid: (flags & FLAG_GID != 0).then_some(gid),
    };
    endpoint.validate()?;
    if count > MAX_REGIONS {
        return Err(VerbsError::TooManyRegions { count });
    }
    let mut regions: Vec<RegionInfo> = Vec::with_capacity(count);
    for _ in 0..count {
        let access = Access::from_byte(r.u8("region access")?)?;
        let name_len = usize::from(r.u8("region name length")?);
        let rkey = r.u32("region rkey")?;
        let gpa = r.u64("region gpa")?;
        let len = r.u64("region len")?;
        let remote_addr = r.u64("region remote_addr")?;
        if name_len == 0 || name_len > MAX_NAME_LEN {
            // Report the name as far as it is there, without reading past the blob.
            let avail = bytes.len().saturating_sub(r.pos).min(name_len);
            let shown = r.take("region name", avail)?;
            return Err(VerbsError::BadName {
                name: String::from_utf8_lossy(shown).into_owned(),
            });
        }
        let name = r.take("region name", name_len)?;
        validate_name(name)?;
        // validate_name accepted only ASCII, so this cannot fail; map the impossible error anyway.
        let name = String::from_utf8(name.to_vec()).map_err(|e| VerbsError::BadName {
            name: String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })?;
        let info = RegionInfo {
            name,
            gpa,
            len,
            remote_addr,
            rkey,
            access,
        };
        info.validate()?;
        if regions.iter().any(|o| o.name == info.name) {
            return Err(VerbsError::DuplicateName { name: info.name });
        }
        regions.push(info);
    }
    if r.pos != bytes.len() {
        return Err(VerbsError::TrailingBytes {
            count: bytes.len() - r.pos,
        });
    }
    Ok((endpoint, regions))
}

/// Names of the RDMA devices on this host; empty (not an error) when the kernel has no RDMA support.
pub fn devices_available() -> Result<Vec<String>, VerbsError> {
    let list = match ibverbs::devices() {
        Ok(list) => list,
        // libibverbs reports a kernel without RDMA support (no /sys/class/infiniband) as ENOSYS.
        Err(e) if e.kind() == io::ErrorKind::Unsupported => return Ok(Vec::new()),
        Err(e) => return Err(VerbsError::DeviceList(e)),
    };
    Ok(list
        .iter()
        .map(|d| {
            d.name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect())
}

fn last_os_error() -> io::Error {
    io::Error::last_os_error()
}

fn errno_error(rc: i32) -> io::Error {
    // Verbs return a positive errno; some providers return -errno or -1 with errno set.
    match rc {
        -1 => io::Error::last_os_error(),
        rc => io::Error::from_raw_os_error(rc.saturating_abs()),
    }
}

fn random_psn() -> u32 {
    // RandomState is seeded from the OS per process and varies per instance; 24 bits are enough.
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0x6264_7276);
    (h.finish() as u32) & (QPN_LIMIT - 1)
}

/// An open device context with what we learnt about port 1. Closes the device on drop.
struct DeviceCtx {
    ctx: NonNull<ffi::ibv_context>,
    name: String,
    lid: u16,
    active_mtu: u8,
    /// GID table index and GID used for routing (RoCE), if any.
    gid: Option<(u8, [u8; 16])>,
    max_mr_size: u64,
    max_qp_rd_atom: u8,
}

impl DeviceCtx {
    fn open(wanted: Option<&str>) -> Result<Self, VerbsError> {
        let mut n: i32 = 0;
        // SAFETY: `n` is a valid out-pointer; the returned list is freed below on every path.
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        if list.is_null() {
            let e = last_os_error();
            return if e.kind() == io::ErrorKind::Unsupported {
                Err(VerbsError::NoDevice)
            } else {
                Err(VerbsError::DeviceList(e))
            };
        }
        let count = usize::try_from(n).unwrap_or(0);
        let mut names = Vec::with_capacity(count);
        let mut chosen: Option<(*mut ffi::ibv_device, String)> = None;
        for i in 0..count {
            // SAFETY: ibv_get_device_list returned an array of `n` valid device pointers.
            let dev = unsafe { *list.add(i) };
            if dev.is_null() {
                continue;
            }
            // SAFETY: `dev` is a valid device of the live list; the name is a NUL-terminated string
            // owned by the device, copied before the list is freed.
            let name_ptr = unsafe { ffi::ibv_get_device_name(dev) };
            let name = if name_ptr.is_null() {
                String::new()
            } else {
                // SAFETY: non-null, NUL-terminated, valid while the list lives.
                unsafe { CStr::from_ptr(name_ptr) }
                    .to_string_lossy()
                    .into_owned()
            };
            if chosen.is_none() && wanted.is_none_or(|w| w == name) {
                chosen = Some((dev, name.clone()));
            }
            names.push(name);
        }
        let result = match chosen {
            None if names.is_empty() => Err(VerbsError::NoDevice),
            None => Err(VerbsError::DeviceNotFound {
                name: wanted.unwrap_or_default().to_owned(),
                available: names.join(", "),
            }),
            Some((dev, name)) => {
                // SAFETY: `dev` comes from the live list; a context opened from it stays valid after
                // the list is freed (libibverbs keeps the device referenced by the context).
                let ctx = unsafe { ffi::ibv_open_device(dev) };
                NonNull::new(ctx)
                    .map(|ctx| (ctx, name))
                    .ok_or_else(|| VerbsError::Verb {
                        verb: "ibv_open_device",
                        source: last_os_error(),
                        hint: "check the permissions of /dev/infiniband/uverbs*",
                    })
            }
        };
        // SAFETY: `list` came from ibv_get_device_list and is freed exactly once; opened contexts
        // stay valid.
        unsafe { ffi::ibv_free_device_list(list) };
        let (ctx, name) = result?;
        let mut dev = DeviceCtx {
            ctx,
            name,
            lid: 0,
            active_mtu: 0,
            gid: None,
            max_mr_size: 0,
            max_qp_rd_atom: 1,
        };
        // From here on `dev` closes the context on every error path.
        dev.query()?;
        Ok(dev)
    }

    fn query(&mut self) -> Result<(), VerbsError> {
        let mut attr = ffi::ibv_device_attr::default();
        // SAFETY: valid context, `attr` is a valid out-pointer of the right type.
        let rc = unsafe { ffi::ibv_query_device(self.ctx.as_ptr(), &mut attr) };
        if rc != 0 {
            return Err(VerbsError::Verb {
                verb: "ibv_query_device",
                source: errno_error(rc),
                hint: "the device driver is not working; check `ibv_devinfo`",
            });
        }
        self.max_mr_size = attr.max_mr_size;
        self.max_qp_rd_atom = u8::try_from(attr.max_qp_rd_atom.max(1)).unwrap_or(u8::MAX);

        let mut port = ffi::ibv_port_attr::default();
        // SAFETY: valid context. The exported ibv_query_port takes the older, shorter compat layout
        // of the port attributes and fills only that prefix of our zeroed, larger struct; this is
        // exactly what verbs.h's inline wrapper does when the provider has no extended query.
        let rc = unsafe {
            ffi::ibv_query_port(
                self.ctx.as_ptr(),
                PORT_NUM,
                (&mut port as *mut ffi::ibv_port_attr).cast::<ffi::_compat_ibv_port_attr>(),
            )
        };
        if rc != 0 {
            return Err(VerbsError::Verb {
                verb: "ibv_query_port",
                source: errno_error(rc),
                hint: "the device has no port 1 or its driver is not working; check `ibv_devinfo`",
            });
        }
        match port.state {
            ffi::ibv_port_state::IBV_PORT_ACTIVE | ffi::ibv_port_state::IBV_PORT_ARMED => {}
            state => {
                return Err(VerbsError::PortNotActive {
                    device: self.name.clone(),
                    port: PORT_NUM,
                    state,
                })
            }
        }
        self.lid = port.lid;
        self.active_mtu = u8::try_from(port.active_mtu)
            .ok()
            .filter(|m| (1..=5).contains(m))
            .unwrap_or(ffi::IBV_MTU_1024 as u8);
        if u32::from(port.link_layer) == ffi::IBV_LINK_LAYER_ETHERNET || port.lid == 0 {
            self.gid = Some(self.pick_gid(&port)?);
        }
        Ok(())
    }

    /// Picks the GID to route with on RoCE: RoCE v2 with an IPv4-mapped address first (what
    /// `rdma_cm` would pick on most networks), then any RoCE v2, then any non-zero GID.
    fn pick_gid(&self, port: &ffi::ibv_port_attr) -> Result<(u8, [u8; 16]), VerbsError> {
        // grh.sgid_index is a u8, so only the first 256 entries can be used.
        let len = u32::try_from(port.gid_tbl_len).unwrap_or(0).min(256);
        let mut usable: Vec<(u8, [u8; 16], u32)> = Vec::new();
        for index in 0..len {
            let mut entry = ffi::ibv_gid_entry::default();
            // SAFETY: valid context; `entry` is a valid out-pointer of the size passed. Empty
            // entries return ENODATA, which we skip like any other failure of one entry.
            let rc = unsafe {
                ffi::_ibv_query_gid_ex(
                    self.ctx.as_ptr(),
                    u32::from(PORT_NUM),
                    index,
                    &mut entry,
                    0,
                    std::mem::size_of::<ffi::ibv_gid_entry>(),
                )
            };
            // SAFETY: a union read; every bit pattern of `ibv_gid` is a valid `[u8; 16]`.
            let gid = unsafe { entry.gid.raw };
            if rc == 0 && gid != [0; 16] {
                if let Ok(i) = u8::try_from(index) {
                    usable.push((i, gid, entry.gid_type));
                }
            }
        }
        let v4_mapped = |g: &[u8; 16]| g[..10] == [0; 10] && g[10..12] == [0xff, 0xff];
        usable
            .iter()
            .find(|(_, g, t)| *t == ffi::IBV_GID_TYPE_ROCE_V2 && v4_mapped(g))
            .or_else(|| {
                usable
                    .iter()
                    .find(|(_, _, t)| *t == ffi::IBV_GID_TYPE_ROCE_V2)
            })
            .or_else(|| usable.first())
            .map(|(i, g, _)| (*i, *g))
            .ok_or_else(|| VerbsError::NoGid {
                device: self.name.clone(),
                port: PORT_NUM,
            })
    }
}

impl Drop for DeviceCtx {
    fn drop(&mut self) {
        // SAFETY: the context was opened by ibv_open_device and every resource created from it is
        // owned by a struct field dropped before this one.
        let rc = unsafe { ffi::ibv_close_device(self.ctx.as_ptr()) };
        if rc != 0 {
            tracing::warn!(device = %self.name, error = %errno_error(rc), "ibv_close_device failed");
        }
    }
}

/// A protection domain. Deallocated on drop.
struct Pd(NonNull<ffi::ibv_pd>);

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_pd; its QPs and MRs are dropped before it.
        let rc = unsafe { ffi::ibv_dealloc_pd(self.0.as_ptr()) };
        if rc != 0 {
            tracing::warn!(error = %errno_error(rc), "ibv_dealloc_pd failed");
        }
    }
}

/// A completion queue. Destroyed on drop.
struct Cq(NonNull<ffi::ibv_cq>);

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_cq; the QPs using it are dropped before it.
        let rc = unsafe { ffi::ibv_destroy_cq(self.0.as_ptr()) };
        if rc != 0 {
            tracing::warn!(error = %errno_error(rc), "ibv_destroy_cq failed");
        }
    }
}

/// A queue pair. Destroyed on drop.
struct Qp(NonNull<ffi::ibv_qp>);

impl Qp {
    fn num(&self) -> u32 {
        // SAFETY: valid QP; qp_num is set at creation and never changes.
        unsafe { (*self.0.as_ptr()).qp_num }
    }

    fn modify(
        &self,
        attr: &mut ffi::ibv_qp_attr,
        mask: ffi::ibv_qp_attr_mask,
        what: &'static str,
    ) -> Result<(), VerbsError> {
        // SAFETY: valid QP; `attr` is a fully initialised attribute struct and `mask` names only
        // the fields we set.
        let rc = unsafe { ffi::ibv_modify_qp(self.0.as_ptr(), attr, mask.0 as i32) };
        if rc != 0 {
            return Err(VerbsError::Verb {
                verb: what,
                source: errno_error(rc),
                hint: "the peer's endpoint does not fit this port (LID/GID/MTU); check both sides \
                       use the same fabric",
            });
        }
        Ok(())
    }

    /// Moves the QP to the error state so that outstanding work requests are flushed.
    fn set_error(&self) {
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_ERR,
            ..Default::default()
        };
        if let Err(e) = self.modify(
            &mut attr,
            ffi::ibv_qp_attr_mask::IBV_QP_STATE,
            "ibv_modify_qp(ERR)",
        ) {
            tracing::warn!(error = %e, "could not move the queue pair to the error state");
        }
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp and destroyed exactly once, before its CQ and PD.
        let rc = unsafe { ffi::ibv_destroy_qp(self.0.as_ptr()) };
        if rc != 0 {
            tracing::warn!(error = %errno_error(rc), "ibv_destroy_qp failed");
        }
    }
}

/// A memory region over memory someone else owns. Deregistered on drop.
struct Mr(NonNull<ffi::ibv_mr>);

impl Mr {
    fn keys(&self) -> (u32, u32, u64) {
        // SAFETY: valid MR; lkey/rkey/addr are set at registration and never change.
        let mr = unsafe { &*self.0.as_ptr() };
        (mr.lkey, mr.rkey, mr.addr as u64)
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered by ibv_reg_mr, deregistered exactly once; the QPs that could use it
        // are destroyed before (field order of the owners).
        let rc = unsafe { ffi::ibv_dereg_mr(self.0.as_ptr()) };
        if rc != 0 {
            tracing::warn!(error = %errno_error(rc), "ibv_dereg_mr failed");
        }
    }
}

/// Device, protection domain and completion queue shared by both sides. Fields drop in order: the
/// CQ, then the PD, then the device context.
struct Base {
    cq: Cq,
    pd: Pd,
    dev: DeviceCtx,
}

impl Base {
    fn open(device: Option<&str>, cq_entries: i32) -> Result<Self, VerbsError> {
        let dev = DeviceCtx::open(device)?;
        // SAFETY: valid context.
        let pd = unsafe { ffi::ibv_alloc_pd(dev.ctx.as_ptr()) };
        let pd = NonNull::new(pd).map(Pd).ok_or_else(|| VerbsError::Verb {
            verb: "ibv_alloc_pd",
            source: last_os_error(),
            hint: "the device is out of protection domains or memory",
        })?;
        // SAFETY: valid context; no completion channel (we poll), no CQ context pointer.
        let cq = unsafe {
            ffi::ibv_create_cq(
                dev.ctx.as_ptr(),
                cq_entries,
                ptr::null_mut(),
                ptr::null_mut(),
                0,
            )
        };
        let cq = NonNull::new(cq).map(Cq).ok_or_else(|| VerbsError::Verb {
            verb: "ibv_create_cq",
            source: last_os_error(),
            hint: "the device is out of completion queues or memory",
        })?;
        Ok(Base { cq, pd, dev })
    }

    fn create_qp(&self, max_send_wr: u32) -> Result<Qp, VerbsError> {
        let mut init = ffi::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: self.cq.0.as_ptr(),
            recv_cq: self.cq.0.as_ptr(),
            srq: ptr::null_mut(),
            cap: ffi::ibv_qp_cap {
                max_send_wr,
                max_recv_wr: 1,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: valid PD and CQ owned by `self`; `init` is fully initialised.
        let qp = unsafe { ffi::ibv_create_qp(self.pd.0.as_ptr(), &mut init) };
        NonNull::new(qp).map(Qp).ok_or_else(|| VerbsError::Verb {
            verb: "ibv_create_qp",
            source: last_os_error(),
            hint: "the device is out of queue pairs or memory",
        })
    }

    fn local_endpoint(&self, qp: &Qp, psn: u32) -> Endpoint {
        Endpoint {
            qp_num: qp.num(),
            psn,
            lid: self.dev.lid,
            mtu: self.dev.active_mtu,
            gid: self.dev.gid.map(|(_, g)| g),
        }
    }

    /// Takes a fresh QP through INIT → RTR → RTS towards `remote`.
    fn connect_qp(
        &self,
        qp: &Qp,
        access: ffi::ibv_access_flags,
        local_psn: u32,
        remote: &Endpoint,
        max_rd_atomic: u8,
        max_dest_rd_atomic: u8,
    ) -> Result<(), VerbsError> {
        remote.validate()?;
        use ffi::ibv_qp_attr_mask as m;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: PORT_NUM,
            qp_access_flags: access.0,
            ..Default::default()
        };
        qp.modify(
            &mut attr,
            m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )?;

        let mut ah = ffi::ibv_ah_attr {
            dlid: remote.lid,
            sl: 0,
            src_path_bits: 0,
            port_num: PORT_NUM,
            ..Default::default()
        };
        match (remote.gid, self.dev.gid) {
            (Some(dgid), Some((sgid_index, _))) => {
                ah.is_global = 1;
                ah.grh.dgid = ffi::ibv_gid { raw: dgid };
                ah.grh.sgid_index = sgid_index;
                ah.grh.hop_limit = 0xff;
            }
            (None, Some(_)) => {
                return Err(VerbsError::BadEndpoint {
                    reason: "this port needs GID routing (RoCE) but the peer sent no GID",
                })
            }
            (Some(_), None) | (None, None) => {
                if remote.lid == 0 {
                    return Err(VerbsError::BadEndpoint {
                        reason: "the peer has only a GID but this port routes by LID",
                    });
                }
            }
        }
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: u32::from(self.dev.active_mtu.min(remote.mtu)),
            dest_qp_num: remote.qp_num,
            rq_psn: remote.psn,
            max_dest_rd_atomic,
            min_rnr_timer: QP_MIN_RNR_TIMER,
            ah_attr: ah,
            ..Default::default()
        };
        qp.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp(RTR)",
        )?;

        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: local_psn,
            timeout: QP_TIMEOUT,
            retry_cnt: QP_RETRY_CNT,
            rnr_retry: QP_RNR_RETRY,
            max_rd_atomic,
            ..Default::default()
        };
        qp.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTS)",
        )
    }
}

/// One connected monitor on the target side.
struct Peer {
    qp: Qp,
}

/// The target (bridge) side: registers guest ranges and accepts monitors' queue pairs.
///
/// Fields drop in declaration order: the monitors' QPs, then the memory regions, then the CQ, PD
/// and device context.
pub struct VerbsTarget {
    peers: Vec<Peer>,
    mrs: Vec<Mr>,
    regions: Vec<RegionInfo>,
    base: Base,
}

// SAFETY: libibverbs objects may be used from any thread (the library is thread safe), every handle
// here is owned exclusively by this value, and the registered host ranges are only handed to the
// kernel, never dereferenced by this module.
unsafe impl Send for VerbsTarget {}

impl std::fmt::Debug for VerbsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsTarget")
            .field("device", &self.base.dev.name)
            .field("regions", &self.regions)
            .field("monitors", &self.peers.len())
            .finish()
    }
}

impl VerbsTarget {
    /// Opens `device` (by name, e.g. `mlx5_0` or `rxe0`), or the first device when `None`.
    ///
    /// Fails with [`VerbsError::NoDevice`] on a host without RDMA devices.
    pub fn open(device: Option<&str>) -> Result<Self, VerbsError> {
        Ok(VerbsTarget {
            peers: Vec::new(),
            mrs: Vec::new(),
            regions: Vec::new(),
            base: Base::open(device, 16)?,
        })
    }

    /// Name of the device in use.
    pub fn device_name(&self) -> &str {
        &self.base.dev.name
    }

    /// The regions registered so far, as monitors see them.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// Registers guest ranges as memory regions, zero copy on the host mapping, each with only the
    /// remote right its spec names. All or nothing: on error none of `specs` stays registered.
    /// Must be called before the first [`VerbsTarget::accept`].
    ///
    /// # Safety
    ///
    /// For every spec, `[host, host + len)` must be a mapping that stays valid (mapped, and not
    /// reused for anything else) until this `VerbsTarget` is dropped, and the process must hold no
    /// Rust references (`&`/`&mut`) into it while the target lives: remote monitors write
    /// `RemoteWrite` ranges at any time, and the kernel pins the pages. bdvmm's guest-memory mapping
    /// of its memfd, accessed only through volatile/raw-pointer copies, satisfies this.
    pub unsafe fn register(
        &mut self,
        specs: Vec<RegionSpec>,
    ) -> Result<Vec<RegionInfo>, VerbsError> {
        if !self.peers.is_empty() {
            return Err(VerbsError::RegisterAfterAccept);
        }
        let total = self.regions.len().saturating_add(specs.len());
        if total > MAX_REGIONS {
            return Err(VerbsError::TooManyRegions { count: total });
        }
        for (i, s) in specs.iter().enumerate() {
            validate_name(s.name.as_bytes())?;
            if s.len == 0 {
                return Err(VerbsError::EmptyRegion {
                    name: s.name.clone(),
                });
            }
            let len = s.len as u64;
            check_end(&s.name, "gpa", s.gpa, len)?;
            check_end(&s.name, "host address", s.host.as_ptr() as u64, len)?;
            if len > self.base.dev.max_mr_size {
                return Err(VerbsError::RegionTooLarge {
                    name: s.name.clone(),
                    len,
                    max: self.base.dev.max_mr_size,
                });
            }
            let dup = self.regions.iter().any(|r| r.name == s.name)
                || specs[..i].iter().any(|o| o.name == s.name);
            if dup {
                return Err(VerbsError::DuplicateName {
                    name: s.name.clone(),
                });
            }
        }
        let mut new_mrs = Vec::with_capacity(specs.len());
        let mut infos = Vec::with_capacity(specs.len());
        for s in specs {
            // SAFETY: the PD is valid; the caller guarantees [host, host + len) is a live mapping
            // that outlives this target (see `# Safety`). The kernel pins the pages; the MR grants
            // only `s.access`'s remote right. On error, `new_mrs` is dropped and deregisters what
            // this call registered.
            let mr = unsafe {
                ffi::ibv_reg_mr(
                    self.base.pd.0.as_ptr(),
                    s.host.as_ptr().cast(),
                    s.len,
                    s.access.mr_flags().0 as i32,
                )
            };
            let mr = NonNull::new(mr)
                .map(Mr)
                .ok_or_else(|| VerbsError::Register {
                    name: s.name.clone(),
                    len: s.len,
                    source: last_os_error(),
                })?;
            let (_, rkey, addr) = mr.keys();
            infos.push(RegionInfo {
                name: s.name,
                gpa: s.gpa,
                len: s.len as u64,
                remote_addr: addr,
                rkey,
                access: s.access,
            });
            new_mrs.push(mr);
        }
        self.mrs.extend(new_mrs);
        self.regions.extend(infos.iter().cloned());
        Ok(infos)
    }

    /// Creates and connects an RC queue pair for one monitor and returns this side's endpoint (to
    /// send back with [`encode_connect`] and [`VerbsTarget::regions`]). The QP allows only the
    /// remote rights that some registered region grants.
    pub fn accept(&mut self, remote: Endpoint) -> Result<Endpoint, VerbsError> {
        remote.validate()?;
        if self.regions.is_empty() {
            return Err(VerbsError::NoRegions);
        }
        if self.peers.len() >= MAX_MONITORS {
            return Err(VerbsError::TooManyMonitors);
        }
        let access = self
            .regions
            .iter()
            .fold(ffi::ibv_access_flags(0), |acc, r| acc | r.access.qp_flags());
        let qp = self.base.create_qp(1)?;
        let psn = random_psn();
        let max_dest = TARGET_MAX_DEST_RD_ATOMIC.min(self.base.dev.max_qp_rd_atom);
        // On error `qp` is dropped and destroyed.
        self.base
            .connect_qp(&qp, access, psn, &remote, 1, max_dest)?;
        let local = self.base.local_endpoint(&qp, psn);
        self.peers.push(Peer { qp });
        Ok(local)
    }

    /// Disconnects the monitor whose connection has local QP number `qp_num` (the `qp_num` of the
    /// endpoint [`VerbsTarget::accept`] returned). Returns whether there was one.
    pub fn release(&mut self, qp_num: u32) -> bool {
        let before = self.peers.len();
        self.peers.retain(|p| p.qp.num() != qp_num);
        self.peers.len() != before
    }

    /// Number of connected monitors.
    pub fn monitors(&self) -> usize {
        self.peers.len()
    }
}

/// The monitor's registered bounce buffer. Owns its allocation; deregisters, then frees, on drop.
struct Bounce {
    mr: NonNull<ffi::ibv_mr>,
    buf: NonNull<u8>,
    len: usize,
    lkey: u32,
}

impl Bounce {
    fn new(pd: &Pd, len: usize) -> Result<Self, VerbsError> {
        let raw: *mut [u8] = Box::into_raw(vec![0u8; len].into_boxed_slice());
        let buf = NonNull::new(raw.cast::<u8>()).ok_or(VerbsError::Verb {
            verb: "allocate bounce buffer",
            source: io::Error::from(io::ErrorKind::OutOfMemory),
            hint: "the host is out of memory",
        })?;
        // SAFETY: valid PD; `buf` is a live allocation of `len` bytes owned by this Bounce until
        // drop. LOCAL_WRITE only: the target gets no right on monitor memory.
        let mr = unsafe {
            ffi::ibv_reg_mr(
                pd.0.as_ptr(),
                buf.as_ptr().cast(),
                len,
                ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32,
            )
        };
        let Some(mr) = NonNull::new(mr) else {
            let source = last_os_error();
            // SAFETY: `raw` came from Box::into_raw above and was never registered.
            drop(unsafe { Box::from_raw(raw) });
            return Err(VerbsError::Register {
                name: "monitor bounce buffer".to_owned(),
                len,
                source,
            });
        };
        // SAFETY: valid MR just registered.
        let lkey = unsafe { (*mr.as_ptr()).lkey };
        Ok(Bounce { mr, buf, len, lkey })
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: registered in `new`, deregistered exactly once; the QP is destroyed before (field
        // order of VerbsMonitor).
        let rc = unsafe { ffi::ibv_dereg_mr(self.mr.as_ptr()) };
        if rc != 0 {
            // The NIC might still write into the buffer: leak it rather than free it.
            tracing::warn!(error = %errno_error(rc), "ibv_dereg_mr failed; leaking the bounce buffer");
            return;
        }
        let raw = ptr::slice_from_raw_parts_mut(self.buf.as_ptr(), self.len);
        // SAFETY: `raw` is the Box<[u8]> leaked in `new`, freed exactly once, no longer registered.
        drop(unsafe { Box::from_raw(raw) });
    }
}

/// Connection state of a monitor.
#[derive(Debug)]
enum LinkState {
    /// QP created, not connected yet.
    Created,
    /// Ready for READ/WRITE.
    Connected,
    /// A timeout or failed completion moved the QP to the error state.
    Broken(String),
}

/// The monitor side: connects to one target and reads/writes its regions with one-sided RDMA.
///
/// Fields drop in declaration order: the QP, then the bounce buffer, then the CQ, PD and device.
pub struct VerbsMonitor {
    qp: Qp,
    bounce: Bounce,
    regions: Vec<RegionInfo>,
    state: LinkState,
    psn: u32,
    next_wr_id: u64,
    timeout: Duration,
    base: Base,
}

// SAFETY: libibverbs objects may be used from any thread, all handles and the bounce buffer are
// owned exclusively by this value, and every operation takes `&mut self`.
unsafe impl Send for VerbsMonitor {}

impl std::fmt::Debug for VerbsMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsMonitor")
            .field("device", &self.base.dev.name)
            .field("qp_num", &self.qp.num())
            .field("state", &self.state)
            .field("regions", &self.regions)
            .finish()
    }
}

impl VerbsMonitor {
    /// Opens `device` (or the first device when `None`), creates the queue pair and registers the
    /// bounce buffer. Fails with [`VerbsError::NoDevice`] on a host without RDMA devices.
    pub fn open(device: Option<&str>) -> Result<Self, VerbsError> {
        let base = Base::open(device, 16)?;
        let qp = base.create_qp(4)?;
        let bounce = Bounce::new(&base.pd, BOUNCE_LEN)?;
        Ok(VerbsMonitor {
            qp,
            bounce,
            regions: Vec::new(),
            state: LinkState::Created,
            psn: random_psn(),
            next_wr_id: 1,
            timeout: DEFAULT_OP_TIMEOUT,
            base,
        })
    }

    /// Name of the device in use.
    pub fn device_name(&self) -> &str {
        &self.base.dev.name
    }

    /// This side's endpoint, to send to the target with [`encode_connect`] (no regions).
    pub fn local_endpoint(&self) -> Endpoint {
        self.base.local_endpoint(&self.qp, self.psn)
    }

    /// The target's region table (after [`VerbsMonitor::connect`]).
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// Sets how long one READ/WRITE chunk may wait for its completion.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Connects to the target's endpoint and adopts its region table (both from the target's
    /// connect blob). The monitor's QP grants the target no remote right.
    pub fn connect(
        &mut self,
        remote: Endpoint,
        regions: Vec<RegionInfo>,
    ) -> Result<(), VerbsError> {
        match &self.state {
            LinkState::Created => {}
            LinkState::Connected => return Err(VerbsError::AlreadyConnected),
            LinkState::Broken(reason) => {
                return Err(VerbsError::Broken {
                    reason: reason.clone(),
                })
            }
        }
        validate_regions(&regions)?;
        let max_rd_atomic = 1;
        if let Err(e) = self.base.connect_qp(
            &self.qp,
            ffi::ibv_access_flags(0),
            self.psn,
            &remote,
            max_rd_atomic,
            1,
        ) {
            // A half-modified QP cannot be taken through INIT again without a reset: poison it.
            self.state = LinkState::Broken(e.to_string());
            return Err(e);
        }
        self.regions = regions;
        self.state = LinkState::Connected;
        Ok(())
    }

    /// Reads `len` bytes of guest-physical memory at `gpa` with one-sided RDMA READs.
    ///
    /// `[gpa, gpa + len)` must lie inside one `RemoteRead` region, else
    /// [`VerbsError::OutOfRegion`] is returned and nothing is sent.
    pub fn read(&mut self, gpa: u64, len: usize) -> Result<Vec<u8>, VerbsError> {
        let (remote_addr, rkey) = self.check(Access::RemoteRead, gpa, len)?;
        let mut out = Vec::with_capacity(len);
        let mut done = 0usize;
        while done < len {
            let chunk = (len - done).min(self.bounce.len);
            self.transfer(
                ffi::ibv_wr_opcode::IBV_WR_RDMA_READ,
                "READ",
                remote_addr + done as u64,
                rkey,
                chunk,
            )?;
            // SAFETY: the READ completed successfully, so the NIC has finished writing the first
            // `chunk` (≤ bounce.len) bytes of the bounce buffer and nothing else is outstanding.
            let data = unsafe { std::slice::from_raw_parts(self.bounce.buf.as_ptr(), chunk) };
            out.extend_from_slice(data);
            done += chunk;
        }
        Ok(out)
    }

    /// Writes `bytes` to guest-physical memory at `gpa` with one-sided RDMA WRITEs.
    ///
    /// `[gpa, gpa + bytes.len())` must lie inside one `RemoteWrite` region, else
    /// [`VerbsError::OutOfRegion`] is returned and nothing is sent.
    pub fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), VerbsError> {
        let (remote_addr, rkey) = self.check(Access::RemoteWrite, gpa, bytes.len())?;
        for (i, piece) in bytes.chunks(self.bounce.len).enumerate() {
            // SAFETY: no work request is outstanding (each transfer waits for its completion), so
            // the NIC does not touch the bounce buffer; `piece.len()` ≤ bounce.len.
            unsafe {
                ptr::copy_nonoverlapping(piece.as_ptr(), self.bounce.buf.as_ptr(), piece.len())
            };
            let offset = (i * self.bounce.len) as u64;
            self.transfer(
                ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                "WRITE",
                remote_addr + offset,
                rkey,
                piece.len(),
            )?;
        }
        Ok(())
    }

    /// Checks state and region table; returns the target address and rkey of the access.
    fn check(&self, access: Access, gpa: u64, len: usize) -> Result<(u64, u32), VerbsError> {
        match &self.state {
            LinkState::Connected => {}
            LinkState::Created => return Err(VerbsError::NotConnected),
            LinkState::Broken(reason) => {
                return Err(VerbsError::Broken {
                    reason: reason.clone(),
                })
            }
        }
        if len > MAX_TRANSFER {
            return Err(VerbsError::TransferTooLarge { len });
        }
        self.regions
            .iter()
            .find_map(|r| Some((r.translate(access, gpa, len as u64)?, r.rkey)))
            .ok_or(VerbsError::OutOfRegion { access, gpa, len })
    }

    /// Posts one signalled RDMA READ/WRITE between the bounce buffer and the target and waits for
    /// its completion. Any failure breaks the connection.
    fn transfer(
        &mut self,
        opcode: ffi::ibv_wr_opcode::Type,
        op: &'static str,
        remote_addr: u64,
        rkey: u32,
        len: usize,
    ) -> Result<(), VerbsError> {
        let wr_id = self.next_wr_id;
        self.next_wr_id = self.next_wr_id.wrapping_add(1);
        let mut sge = ffi::ibv_sge {
            addr: self.bounce.buf.as_ptr() as u64,
            // len ≤ BOUNCE_LEN (1 MiB), checked by the callers' chunking.
            length: len as u32,
            lkey: self.bounce.lkey,
        };
        let mut wr = ffi::ibv_send_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
            opcode,
            send_flags: ffi::ibv_send_flags::IBV_SEND_SIGNALED.0,
            ..Default::default()
        };
        wr.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey };
        let mut bad: *mut ffi::ibv_send_wr = ptr::null_mut();
        let qp = self.qp.0.as_ptr();
        // SAFETY: `qp` is valid and its context pointer is set by libibverbs at creation.
        let post = unsafe { (*(*qp).context).ops.post_send };
        let Some(post) = post else {
            return Err(self.broken(VerbsError::Verb {
                verb: "ibv_post_send",
                source: io::Error::from(io::ErrorKind::Unsupported),
                hint: "the device provider has no post_send; the driver is broken",
            }));
        };
        // SAFETY: `qp` is valid; `wr` and `sge` live across the call (the provider copies them
        // into its send queue); the sge covers `len` bytes of the registered bounce buffer.
        let rc = unsafe { post(qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(self.broken(VerbsError::Verb {
                verb: "ibv_post_send",
                source: errno_error(rc),
                hint: "the send queue is full or the queue pair is in the error state; reconnect",
            }));
        }
        self.wait(wr_id, op)
    }

    /// Polls the CQ until the completion of `wr_id` arrives or the timeout expires.
    fn wait(&mut self, wr_id: u64, op: &'static str) -> Result<(), VerbsError> {
        let cq = self.base.cq.0.as_ptr();
        // SAFETY: `cq` is valid and its context pointer is set by libibverbs at creation.
        let poll = unsafe { (*(*cq).context).ops.poll_cq };
        let Some(poll) = poll else {
            return Err(self.broken(VerbsError::Verb {
                verb: "ibv_poll_cq",
                source: io::Error::from(io::ErrorKind::Unsupported),
                hint: "the device provider has no poll_cq; the driver is broken",
            }));
        };
        let deadline = Instant::now() + self.timeout;
        let mut polls = 0u32;
        let mut wcs = [ffi::ibv_wc::default(); POLL_BATCH];
        loop {
            // SAFETY: `cq` is valid; `wcs` has room for POLL_BATCH completions.
            let n = unsafe { poll(cq, POLL_BATCH as i32, wcs.as_mut_ptr()) };
            let n = match usize::try_from(n) {
                Ok(n) => n.min(POLL_BATCH),
                Err(_) => {
                    return Err(self.broken(VerbsError::Verb {
                        verb: "ibv_poll_cq",
                        source: io::Error::other(format!("returned {n}")),
                        hint: "the completion queue overran or the device failed; reconnect",
                    }))
                }
            };
            for wc in &wcs[..n] {
                if wc.wr_id() != wr_id {
                    tracing::warn!(
                        got = wc.wr_id(),
                        expected = wr_id,
                        "ignoring a stale work completion"
                    );
                    continue;
                }
                return match wc.error() {
                    None => Ok(()),
                    Some((code, vendor_err)) => Err(self.broken(VerbsError::Completion {
                        op,
                        status: status_text(code),
                        code,
                        vendor_err,
                        hint: status_hint(code),
                    })),
                };
            }
            if Instant::now() >= deadline {
                return Err(self.broken(VerbsError::Timeout {
                    op,
                    after: self.timeout,
                }));
            }
            polls = polls.saturating_add(1);
            if polls < SPIN_POLLS {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(POLL_SLEEP);
            }
        }
    }

    /// Marks the connection broken (moving the QP to the error state) and returns `e`.
    fn broken(&mut self, e: VerbsError) -> VerbsError {
        if !matches!(self.state, LinkState::Broken(_)) {
            self.qp.set_error();
            self.state = LinkState::Broken(e.to_string());
        }
        e
    }
}

fn status_text(code: u32) -> String {
    // SAFETY: ibv_wc_status_str accepts any value and returns a static NUL-terminated string (or
    // null, handled).
    let p = unsafe { ffi::ibv_wc_status_str(code) };
    if p.is_null() {
        return format!("status {code}");
    }
    // SAFETY: non-null static C string from libibverbs.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn status_hint(code: u32) -> &'static str {
    use ffi::ibv_wc_status as s;
    match code {
        s::IBV_WC_REM_ACCESS_ERR => {
            "the target refused the access (rkey, range or rights): the region table is stale or \
             the bridge revoked it"
        }
        s::IBV_WC_RETRY_EXC_ERR => {
            "the target did not answer: it is down, unreachable, or its queue pair was released"
        }
        s::IBV_WC_REM_INV_REQ_ERR => {
            "the target's queue pair does not allow this operation (no region grants it)"
        }
        s::IBV_WC_WR_FLUSH_ERR => "the queue pair was already in the error state",
        _ => "see ibv_poll_cq(3) for this status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        Endpoint {
            qp_num: 0x00ab_cdef,
            psn: 0x0012_3456,
            lid: 7,
            mtu: 3,
            gid: Some([
                0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x02, 0x11, 0x22, 0xff, 0xfe, 0x33, 0x44, 0x55,
            ]),
        }
    }

    fn region(name: &str, gpa: u64, len: u64, access: Access) -> RegionInfo {
        RegionInfo {
            name: name.to_owned(),
            gpa,
            len,
            remote_addr: 0x7f00_0000_0000 + gpa,
            rkey: 0x1234_5678,
            access,
        }
    }

    fn table() -> Vec<RegionInfo> {
        vec![
            region("sb", 0x10_0000, 0x1000, Access::RemoteRead),
            region("tasks", 0x20_0000, 0x10_0000, Access::RemoteRead),
            region("hooks", 0x10_1000, 0x40, Access::RemoteWrite),
        ]
    }

    #[test]
    fn round_trip() {
        let ep = endpoint();
        let regions = table();
        let blob = encode_connect(&ep, &regions).unwrap();
        assert_eq!(
            blob.len(),
            CONNECT_HEADER_LEN + 3 * REGION_RECORD_LEN + "sb".len() + "tasks".len() + "hooks".len()
        );
        let (ep2, regions2) = decode_connect(&blob).unwrap();
        assert_eq!(ep2, ep);
        assert_eq!(regions2, regions);
    }

    #[test]
    fn round_trip_without_gid_and_regions() {
        let ep = Endpoint {
            gid: None,
            ..endpoint()
        };
        let blob = encode_connect(&ep, &[]).unwrap();
        assert_eq!(blob.len(), CONNECT_HEADER_LEN);
        assert_eq!(decode_connect(&blob).unwrap(), (ep, Vec::new()));
    }

    #[test]
    fn layout_is_little_endian_as_documented() {
        let blob = encode_connect(&endpoint(), &table()[..1]).unwrap();
        assert_eq!(&blob[0..4], b"BDRV");
        assert_eq!(blob[4], 1);
        assert_eq!(blob[5], 1);
        assert_eq!(blob[6], 3);
        assert_eq!(blob[7], 1);
        assert_eq!(&blob[8..12], &0x00ab_cdef_u32.to_le_bytes());
        assert_eq!(&blob[12..16], &0x0012_3456_u32.to_le_bytes());
        assert_eq!(&blob[16..18], &7u16.to_le_bytes());
        assert_eq!(&blob[18..20], &[0, 0]);
        assert_eq!(blob[20], 0xfe);
        let rec = &blob[36..];
        assert_eq!(rec[0], 1);
        assert_eq!(rec[1], 2);
        assert_eq!(&rec[2..6], &0x1234_5678_u32.to_le_bytes());
        assert_eq!(&rec[6..14], &0x10_0000_u64.to_le_bytes());
        assert_eq!(&rec[14..22], &0x1000_u64.to_le_bytes());
        assert_eq!(
            &rec[22..30],
            &(0x7f00_0000_0000_u64 + 0x10_0000).to_le_bytes()
        );
        assert_eq!(&rec[30..], b"sb");
    }

    #[test]
    fn largest_blob_fits() {
        let regions: Vec<RegionInfo> = (0..MAX_REGIONS)
            .map(|i| {
                let name = format!("{i:0>32}");
                region(&name, (i as u64) << 20, 1 << 20, Access::RemoteRead)
            })
            .collect();
        let blob = encode_connect(&endpoint(), &regions).unwrap();
        assert_eq!(blob.len(), 4004);
        assert!(blob.len() <= MAX_CONNECT_LEN);
        assert_eq!(decode_connect(&blob).unwrap().1, regions);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let blob = encode_connect(&endpoint(), &table()).unwrap();
        for cut in 0..blob.len() {
            match decode_connect(&blob[..cut]) {
                Err(VerbsError::ConnectTruncated { len, .. }) => assert_eq!(len, cut),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn oversized_blob_is_rejected() {
        let blob = vec![0u8; MAX_CONNECT_LEN + 1];
        assert!(matches!(
            decode_connect(&blob),
            Err(VerbsError::ConnectTooLong { len }) if len == MAX_CONNECT_LEN + 1
        ));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut blob = encode_connect(&endpoint(), &table()).unwrap();
        blob.push(0);
        assert!(matches!(
            decode_connect(&blob),
            Err(VerbsError::TrailingBytes { count: 1 })
        ));
    }

    #[test]
    fn bad_magic_version_flags_reserved() {
        let good = encode_connect(&endpoint(), &[]).unwrap();
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(
            decode_connect(&b),
            Err(VerbsError::ConnectMagic { .. })
        ));
        let mut b = good.clone();
        b[4] = 2;
        assert!(matches!(
            decode_connect(&b),
            Err(VerbsError::ConnectVersion { version: 2 })
        ));
        let mut b = good.clone();
        b[5] = 0x03;
        assert!(matches!(
            decode_connect(&b),
            Err(VerbsError::ConnectReserved { .. })
        ));
        let mut b = good.clone();
        b[19] = 1;
        assert!(matches!(
            decode_connect(&b),
            Err(VerbsError::ConnectReserved { .. })
        ));
        // GID bytes without the GID flag.
        let mut b = good.clone();
        b[5] = 0;
        assert!(matches!(
            decode_connect(&b),
            Err(VerbsError::ConnectReserved { .. })
        ));
    }

    #[test]
    fn bad_endpoints_are_rejected() {
        let cases = [
            Endpoint {
                qp_num: 0,
                ..endpoint()
            },
            Endpoint {
                qp_num: 1,
                ..endpoint()
            },
            Endpoint {
                qp_num: QPN_LIMIT,
                ..endpoint()
            },
            Endpoint {
                psn: QPN_LIMIT,
                ..endpoint()
            },
            Endpoint {
                mtu: 0,
                ..endpoint()
            },
            Endpoint {
                mtu: 6,
                ..endpoint()
            },
            Endpoint {
                lid: 0,
                gid: None,
                ..endpoint()
            },
            Endpoint {
                gid: Some([0; 16]),
                ..endpoint()
            },
        ];
        let good = encode_connect(&endpoint(), &[]).unwrap();
        for ep in cases {
            assert!(
                matches!(
                    encode_connect(&ep, &[]),
                    Err(VerbsError::BadEndpoint { .. })
                ),
                "encode accepted {ep:?}"
            );
            // The same fields patched into a good blob are rejected by the decoder.
            let mut b = good.clone();
            b[5] = u8::from(ep.gid.is_some());
            b[6] = ep.mtu;
            b[8..12].copy_from_slice(&ep.qp_num.to_le_bytes());
            b[12..16].copy_from_slice(&ep.psn.to_le_bytes());
            b[16..18].copy_from_slice(&ep.lid.to_le_bytes());
            b[20..36].copy_from_slice(&ep.gid.unwrap_or([0; 16]));
            assert!(
                matches!(decode_connect(&b), Err(VerbsError::BadEndpoint { .. })),
                "decode accepted {ep:?}"
            );
        }
    }

    #[test]
    fn too_many_regions_are_rejected() {
        let regions: Vec<RegionInfo> = (0..=MAX_REGIONS)
            .map(|i| {
                region(
                    &format!("r{i}"),
                    (i as u64) << 12,
                    0x1000,
                    Access::RemoteRead,
                )
            })
            .collect();
        assert!(matches!(
            encode_connect(&endpoint(), &regions),
            Err(VerbsError::TooManyRegions { count: 65 })
        ));
        let mut blob = encode_connect(&endpoint(), &regions[..MAX_REGIONS]).unwrap();
        blob[7] = 65;
        assert!(matches!(
            decode_connect(&blob),
            Err(VerbsError::TooManyRegions { count: 65 })
        ));
        blob[7] = 255;
        assert!(matches!(
            decode_connect(&blob),
            Err(VerbsError::TooManyRegions { count: 255 })
        ));
    }

    #[test]
    fn bad_names_are_rejected() {
        let long = "n".repeat(MAX_NAME_LEN + 1);
        for name in ["", long.as_str(), "has space", "tab\t", "caf\u{e9}"] {
            let r = region(name, 0, 1, Access::RemoteRead);
            assert!(
                matches!(
                    encode_connect(&endpoint(), &[r]),
                    Err(VerbsError::BadName { .. })
                ),
                "encode accepted {name:?}"
            );
        }
        // A name of exactly MAX_NAME_LEN is fine.
        let ok = region(&"n".repeat(MAX_NAME_LEN), 0, 1, Access::RemoteRead);
        encode_connect(&endpoint(), &[ok]).unwrap();

        let good = encode_connect(&endpoint(), &[region("ab", 0, 1, Access::RemoteRead)]).unwrap();
        let name_len_at = CONNECT_HEADER_LEN + 1;
        let name_at = CONNECT_HEADER_LEN + REGION_RECORD_LEN;
        // Declared length 0, and 33 (longer than the limit) with enough bytes present.
        let mut b = good.clone();
        b[name_len_at] = 0;
        b.truncate(name_at);
        assert!(matches!(
            decode_connect(&b),
            Err(VerbsError::BadName { .. })
        ));
        let mut b = good.clone();
        b[name_len_at] = (MAX_NAME_LEN + 1) as u8;
        b.truncate(name_at);
        b.extend_from_slice(&[b'x'; MAX_NAME_LEN + 1]);
        assert!(matches!(
            decode_connect(&b),
            Err(VerbsError::BadName { .. })
        ));
        // Declared length 255 with few bytes present: still a name error, no over-read.
        let mut b = good.clone();
        b[name_len_at] = 255;
        assert!(matches!(
            decode_connect(&b),
            Err(VerbsError::BadName { .. })
        ));
        // Control byte, space, non-ASCII byte in the name.
        for bad in [0x07u8, b' ', 0xc3] {
            let mut b = good.clone();
            b[name_at] = bad;
            assert!(matches!(
                decode_connect(&b),
                Err(VerbsError::BadName { .. })
            ));
        }
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let regions = vec![
            region("sb", 0, 0x1000, Access::RemoteRead),
            region("sb", 0x1000, 0x1000, Access::RemoteWrite),
        ];
        assert!(matches!(
            encode_connect(&endpoint(), &regions),
            Err(VerbsError::DuplicateName { .. })
        ));
        let mut regions = regions;
        regions[1].name = "sc".to_owned();
        let mut blob = encode_connect(&endpoint(), &regions).unwrap();
        let last = blob.len() - 1;
        blob[last] = b'b';
        assert!(matches!(
            decode_connect(&blob),
            Err(VerbsError::DuplicateName { .. })
        ));
    }

    #[test]
    fn bad_access_byte_is_rejected() {
        let good = encode_connect(&endpoint(), &table()[..1]).unwrap();
        for byte in [0u8, 3, 0x81, 0xff] {
            let mut b = good.clone();
            b[CONNECT_HEADER_LEN] = byte;
            assert!(
                matches!(decode_connect(&b), Err(VerbsError::BadAccess { byte: got }) if got == byte)
            );
        }
    }

    #[test]
    fn empty_and_overflowing_regions_are_rejected() {
        let empty = region("e", 0x1000, 0, Access::RemoteRead);
        assert!(matches!(
            encode_connect(&endpoint(), &[empty]),
            Err(VerbsError::EmptyRegion { .. })
        ));
        let gpa_overflow = RegionInfo {
            gpa: u64::MAX - 0xfff,
            remote_addr: 0x1000,
            ..region("g", 0, 0x1000, Access::RemoteRead)
        };
        assert!(matches!(
            encode_connect(&endpoint(), std::slice::from_ref(&gpa_overflow)),
            Err(VerbsError::RegionOverflow { what: "gpa", .. })
        ));
        let addr_overflow = RegionInfo {
            remote_addr: u64::MAX,
            ..region("a", 0, 2, Access::RemoteWrite)
        };
        assert!(matches!(
            encode_connect(&endpoint(), std::slice::from_ref(&addr_overflow)),
            Err(VerbsError::RegionOverflow {
                what: "remote_addr",
                ..
            })
        ));

        // The decoder catches the same things in a patched blob.
        let good =
            encode_connect(&endpoint(), &[region("g", 0, 0x1000, Access::RemoteRead)]).unwrap();
        let rec = CONNECT_HEADER_LEN;
        let mut b = good.clone();
        b[rec + 6..rec + 14].copy_from_slice(&(u64::MAX - 0xfff).to_le_bytes());
        assert!(matches!(
            decode_connect(&b),
            Err(VerbsError::RegionOverflow { what: "gpa", .. })
        ));
        let mut b = good.clone();
        b[rec + 22..rec + 30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode_connect(&b),
            Err(VerbsError::RegionOverflow {
                what: "remote_addr",
                ..
            })
        ));
        let mut b = good.clone();
        b[rec + 14..rec + 22].copy_from_slice(&0u64.to_le_bytes());
        assert!(matches!(
            decode_connect(&b),
            Err(VerbsError::EmptyRegion { .. })
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: flip every byte of a valid blob to several values.
        let good = encode_connect(&endpoint(), &table()).unwrap();
        for i in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                let _ = decode_connect(&b);
            }
        }
    }

    #[test]
    fn translate_checks_containment_and_access() {
        let r = region("tasks", 0x20_0000, 0x1000, Access::RemoteRead);
        assert_eq!(
            r.translate(Access::RemoteRead, 0x20_0000, 0x1000),
            Some(r.remote_addr)
        );
        assert_eq!(
            r.translate(Access::RemoteRead, 0x20_0ff0, 0x10),
            Some(r.remote_addr + 0xff0)
        );
        assert_eq!(r.translate(Access::RemoteRead, 0x20_0ff0, 0x11), None);
        assert_eq!(r.translate(Access::RemoteRead, 0x1f_ffff, 1), None);
        assert_eq!(r.translate(Access::RemoteWrite, 0x20_0000, 1), None);
        assert_eq!(r.translate(Access::RemoteRead, u64::MAX, 2), None);
    }

    #[test]
    fn endpoint_converts_to_and_from_the_crate_type() {
        let ep = endpoint();
        let qpe: ibverbs::QueuePairEndpoint = ep.into();
        assert_eq!(qpe.num, ep.qp_num);
        assert_eq!(qpe.lid, ep.lid);
        let back = Endpoint::from(qpe);
        assert_eq!(back.gid, ep.gid);
        assert_eq!(back.qp_num, ep.qp_num);
        assert_eq!(back.psn, 0);
    }
}
