//! [`VerbsError`]: the one error type of the verbs transport, for the connect blob (built with or
//! without the `verbs` feature) and for the devices, the target and the monitor (feature `verbs`).

use std::io;
use std::time::Duration;

use thiserror::Error;

use super::{
    Access, CONNECT_VERSION, MAX_CONNECT_LEN, MAX_MONITORS, MAX_NAME_LEN, MAX_REGIONS, MAX_TRANSFER,
};

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
    /// The blob does not start with [`CONNECT_MAGIC`](super::CONNECT_MAGIC).
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
    /// The write window was asked for on a connection without a write region.
    #[error(
        "this monitor's RDMA connection has no write region (its grant has no write range, or \
         agreement.k > 1 keeps writes on the control channel); use the control channel's WRITE"
    )]
    NoWriteRegion,
    /// `accept` was called without any region.
    #[error(
        "the monitor has no range to access over RDMA (its grant is empty); use the control \
         channel, or grant it read ranges in the bridge config"
    )]
    NoRegions,
    /// Too many monitors connected.
    #[error(
        "{MAX_MONITORS} RDMA queue pairs are already connected to this bridge; retry after some \
         monitor sessions have ended"
    )]
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
