//! The bridge's binary frame format (wire protocol version 1).
//!
//! Every message between a monitor and the bridge is one **frame**: a fixed 20-byte header followed by
//! a payload. All integers are **little-endian**. The bridge is fed by untrusted peers, so decoding is
//! total: any byte string yields a frame or a [`WireError`], never a panic, and nothing is allocated
//! for a payload before its declared length has been checked against [`MAX_PAYLOAD`].
//!
//! # Header (20 bytes)
//!
//! | offset | size | field          | meaning                                                          |
//! |-------:|-----:|----------------|------------------------------------------------------------------|
//! | 0      | 4    | `magic`        | the bytes `"BDBR"` (`0x5242_4442` read as a little-endian u32)   |
//! | 4      | 1    | `version`      | [`VERSION`] (1); anything else is rejected                       |
//! | 5      | 1    | `op`           | operation code, see the table below                              |
//! | 6      | 2    | `flags`        | reserved, must be 0 in version 1                                 |
//! | 8      | 8    | `request_id`   | chosen by the monitor; a reply carries the id of its request     |
//! | 16     | 4    | `payload_len`  | payload bytes that follow, at most [`MAX_PAYLOAD`] (16 MiB)      |
//!
//! # Operations
//!
//! Requests go monitor → bridge; replies go bridge → monitor. A successful reply uses the op code of
//! its request with the high bit set (`0x80 | op`); a failed one is `ERROR`.
//!
//! | op     | name         | payload (offsets relative to the payload)                                          |
//! |-------:|--------------|------------------------------------------------------------------------------------|
//! | `0x01` | `HELLO`      | `nonce u64` @0, `id_len u8` @8, `monitor_id [id_len]` @9 (UTF-8, 1..=64 bytes). Placeholder for authentication |
//! | `0x02` | `FETCH_SB`   | empty                                                                              |
//! | `0x03` | `READ`       | `gpa u64` @0, `len u32` @8 (`len` ≤ [`MAX_READ_LEN`], `gpa + len` must not overflow) |
//! | `0x04` | `READ_BATCH` | `count u16` @0 (≤ [`MAX_BATCH_RANGES`]), then `count` × (`gpa u64`, `len u32`); the reply must fit in one frame |
//! | `0x05` | `WRITE`      | `gpa u64` @0, then the bytes to write (the rest of the payload)                    |
//! | `0x06` | `LOCK`       | `lease_ms u32` @0: the lock is released by the bridge when the lease runs out      |
//! | `0x07` | `UNLOCK`     | empty                                                                              |
//! | `0x08` | `REGS`       | `vcpu u8` @0                                                                       |
//! | `0x09` | `RDMA_CONNECT` | the monitor's RDMA endpoint, an opaque blob of at most [`MAX_RDMA_BLOB`] bytes (format in `rdma_bridge::verbs::connect`) |
//! | `0x0A` | `STATUS`     | empty                                                                              |
//! | `0x0B` | `RESTART`    | empty: reboot the guest in place (monitors with `restart = true` only)             |
//! | `0x81` | `HELLO` ok   | `nonce u64` @0 (the bridge's), `backdoor_gpa u64` @8, `backdoor_size u64` @16: where the Sensor Box range is |
//! | `0x82` | `FETCH_SB` ok| the Sensor Box bytes (a consistent snapshot)                                       |
//! | `0x83` | `READ` ok    | the bytes read (exactly the requested `len`; checked by the client, not here)      |
//! | `0x84` | `READ_BATCH` ok | `count u16` @0 (≤ [`MAX_BATCH_RANGES`]), then `count` × (`len u32`, `bytes [len]`) |
//! | `0x85` | `WRITE` ok   | empty                                                                              |
//! | `0x86` | `LOCK` ok    | `lock_ns u64` @0: nanoseconds until every vCPU acknowledged the pause              |
//! | `0x87` | `UNLOCK` ok  | empty                                                                              |
//! | `0x88` | `REGS` ok    | [`Regs`]: 90 bytes, see below                                                      |
//! | `0x89` | `RDMA_CONNECT` ok | the bridge's endpoint and regions, an opaque blob of at most [`MAX_RDMA_BLOB`] bytes |
//! | `0x8B` | `RESTART` ok | empty                                                                              |
//! | `0x8A` | `STATUS` ok  | `state u8` @0 (0 running, 1 paused, 2 stopped), `vcpus u8` @1, `uptime_ms u64` @2, `pauses u64` @10 |
//! | `0xFF` | `ERROR`      | `code u16` @0 (see [`code`]), then a UTF-8 message (the rest, ≤ [`MAX_ERROR_MESSAGE`] bytes) |
//!
//! # `REGS` ok payload (90 bytes)
//!
//! | offset | size | field                                                     |
//! |-------:|-----:|-----------------------------------------------------------|
//! | 0      | 8    | `rip`                                                     |
//! | 8      | 8    | `rsp`                                                     |
//! | 16     | 8    | `rflags`                                                  |
//! | 24     | 8    | `cr0`                                                     |
//! | 32     | 8    | `cr2`                                                     |
//! | 40     | 8    | `cr3`                                                     |
//! | 48     | 8    | `cr4`                                                     |
//! | 56     | 8    | `efer`                                                    |
//! | 64     | 8    | `fs_base`                                                 |
//! | 72     | 8    | `gs_base`                                                 |
//! | 80     | 8    | `kernel_gs_base` (0 when absent)                          |
//! | 88     | 1    | `cpl` (0..=3)                                             |
//! | 89     | 1    | `kernel_gs_base` present: 0 or 1                          |
//!
//! # Strictness
//!
//! Encoding is canonical: the decoder accepts exactly what [`encode`] produces, so a frame that decodes
//! re-encodes to the same bytes. Fixed-size payloads with extra bytes are [`WireError::TrailingBytes`];
//! short ones are [`WireError::Malformed`]. [`encode`] applies the same checks as the decoder and
//! refuses frames the decoder would reject.
//!
//! # Streaming
//!
//! [`Decoder`] takes bytes in whatever chunks the transport delivers (a peer may send a frame byte by
//! byte or stop mid-frame) and hands out complete frames. It bounds the bytes it buffers, rejects a bad
//! magic after 4 bytes and a bad header after 20, and after any error it is *poisoned*: the stream can
//! no longer be trusted to be in sync, so the connection should be answered with `ERROR` (where
//! possible) and closed.

use thiserror::Error;

/// The four magic bytes at the start of every frame.
pub const MAGIC_BYTES: [u8; 4] = *b"BDBR";
/// [`MAGIC_BYTES`] as the little-endian u32 in the header.
pub const MAGIC: u32 = u32::from_le_bytes(MAGIC_BYTES);
/// The protocol version this module speaks.
pub const VERSION: u8 = 1;
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 20;
/// Hard maximum payload of one frame (16 MiB); checked before anything is allocated for it.
pub const MAX_PAYLOAD: u32 = 16 * 1024 * 1024;
/// Largest `READ` length: the reply must fit in one frame.
pub const MAX_READ_LEN: u32 = MAX_PAYLOAD;
/// Most ranges in one `READ_BATCH`.
pub const MAX_BATCH_RANGES: u16 = 256;
/// Longest monitor id in `HELLO`, in bytes.
pub const MAX_MONITOR_ID: usize = 64;
/// Longest `ERROR` message, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 256;
/// Size of the `REGS` reply payload.
pub const REGS_LEN: usize = 90;
/// Bytes a [`Decoder`] buffers beyond one maximal frame by default: room for one read chunk.
pub const DEFAULT_SLACK: usize = 64 * 1024;

/// Error codes carried by `ERROR` replies. The set is open: a client must accept unknown codes.
pub mod code {
    /// The request was malformed or not understood.
    pub const BAD_REQUEST: u16 = 1;
    /// The peer has not authenticated (no successful `HELLO`).
    pub const UNAUTHENTICATED: u16 = 2;
    /// The Guard refused the access (range not granted to this monitor).
    pub const DENIED: u16 = 3;
    /// The address range is not guest memory.
    pub const OUT_OF_RANGE: u16 = 4;
    /// The operation needs the lock and it is not held by this monitor.
    pub const NOT_LOCKED: u16 = 5;
    /// The lock is held by another monitor.
    pub const BUSY: u16 = 6;
    /// No such vCPU.
    pub const NO_SUCH_VCPU: u16 = 7;
    /// The bridge failed internally (the VMM went away, ...).
    pub const INTERNAL: u16 = 8;
    /// A write was not confirmed by enough monitors within the agreement window; nothing was written.
    pub const EXPIRED: u16 = 9;
    /// The bridge does not support the operation (e.g. RDMA without the `verbs` feature).
    pub const UNSUPPORTED: u16 = 10;
}

/// Everything that can go wrong encoding or decoding a frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The stream does not start with `"BDBR"`: the peer does not speak this protocol.
    #[error(
        "bad magic {found:#010x} (expected \"BDBR\"): the peer does not speak the bridge protocol"
    )]
    BadMagic {
        /// The first four bytes, as a little-endian u32.
        found: u32,
    },
    /// The header names a protocol version this bridge does not speak.
    #[error("unsupported protocol version {version} (this side speaks {VERSION}): upgrade the older side")]
    UnsupportedVersion {
        /// The version in the header.
        version: u8,
    },
    /// The header's op code is not defined.
    #[error("unknown op code {op:#04x}")]
    UnknownOp {
        /// The op code.
        op: u8,
    },
    /// Reserved header flags are set.
    #[error("reserved header flags {flags:#06x} are set (version {VERSION} defines none)")]
    ReservedFlags {
        /// The flags field.
        flags: u16,
    },
    /// The declared (or encoded) payload is larger than the limit.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// Declared payload length.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The peer sent more bytes than the decoder may buffer.
    #[error("peer sent {buffered} unprocessed bytes, more than the limit of {limit}: drain frames between pushes")]
    BufferFull {
        /// Bytes that would have been buffered.
        buffered: usize,
        /// The limit.
        limit: usize,
    },
    /// A complete frame was expected but the bytes end early.
    #[error("truncated frame: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes the frame needs.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The payload does not have the shape its op requires.
    #[error("malformed {op} payload: {what}")]
    Malformed {
        /// The op whose payload is malformed.
        op: &'static str,
        /// What is wrong.
        what: String,
    },
    /// Bytes are left after the payload's last field, or after the frame in [`decode`].
    #[error("{extra} trailing bytes after the {op} {where_}")]
    TrailingBytes {
        /// The op concerned.
        op: &'static str,
        /// "payload" or "frame".
        where_: &'static str,
        /// How many bytes are left over.
        extra: usize,
    },
    /// A `READ_BATCH` request or reply has too many ranges.
    #[error("{count} ranges in a batch, more than the limit of {MAX_BATCH_RANGES}")]
    TooManyRanges {
        /// The count in the payload.
        count: usize,
    },
    /// A read (or a batch of reads) could not be answered in one frame.
    #[error(
        "read of {len} bytes cannot be answered in one frame (limit {MAX_READ_LEN}): split it"
    )]
    ReadTooLarge {
        /// Requested bytes (for a batch: the whole reply payload).
        len: u64,
    },
    /// `gpa + len` overflows the 64-bit address space.
    #[error("range at {gpa:#x} of {len} bytes wraps around the address space")]
    RangeOverflow {
        /// Start address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A string field is too long.
    #[error("{field} is {len} bytes long, more than the limit of {max}")]
    StringTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A string field is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which field.
        field: &'static str,
    },
    /// The decoder failed earlier; the stream is out of sync.
    #[error("the decoder already failed on this stream: close the connection")]
    Poisoned,
}

/// Operation codes (the header's `op` byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Authentication placeholder.
    Hello = 0x01,
    /// Fetch the Sensor Box.
    FetchSb = 0x02,
    /// Read one range.
    Read = 0x03,
    /// Read many ranges.
    ReadBatch = 0x04,
    /// Write bytes.
    Write = 0x05,
    /// Take the pause lock.
    Lock = 0x06,
    /// Release the pause lock.
    Unlock = 0x07,
    /// Read a vCPU's registers.
    Regs = 0x08,
    /// Exchange RDMA queue-pair endpoints and region keys (feature `verbs`).
    RdmaConnect = 0x09,
    /// The VM's run state.
    Status = 0x0A,
    /// Restart the guest in place.
    Restart = 0x0B,
    /// Reply to `HELLO`.
    HelloOk = 0x81,
    /// Reply to `FETCH_SB`.
    FetchSbOk = 0x82,
    /// Reply to `READ`.
    ReadOk = 0x83,
    /// Reply to `READ_BATCH`.
    ReadBatchOk = 0x84,
    /// Reply to `WRITE`.
    WriteOk = 0x85,
    /// Reply to `LOCK`.
    LockOk = 0x86,
    /// Reply to `UNLOCK`.
    UnlockOk = 0x87,
    /// Reply to `REGS`.
    RegsOk = 0x88,
    /// Reply to `RDMA_CONNECT`.
    RdmaConnectOk = 0x89,
    /// Reply to `STATUS`.
    StatusOk = 0x8A,
    /// Reply to `RESTART`.
    RestartOk = 0x8B,
    /// Failure reply to any request.
    Error = 0xFF,
}

impl Op {
    /// The op for a header byte, if defined.
    pub fn from_u8(op: u8) -> Option<Op> {
        Some(match op {
            0x01 => Op::Hello,
            0x02 => Op::FetchSb,
            0x03 => Op::Read,
            0x04 => Op::ReadBatch,
            0x05 => Op::Write,
            0x06 => Op::Lock,
            0x07 => Op::Unlock,
            0x08 => Op::Regs,
            0x09 => Op::RdmaConnect,
            0x0A => Op::Status,
            0x0B => Op::Restart,
            0x81 => Op::HelloOk,
            0x82 => Op::FetchSbOk,
            0x83 => Op::ReadOk,
            0x84 => Op::ReadBatchOk,
            0x85 => Op::WriteOk,
            0x86 => Op::LockOk,
            0x87 => Op::UnlockOk,
            0x88 => Op::RegsOk,
            0x89 => Op::RdmaConnectOk,
            0x8A => Op::StatusOk,
            0x8B => Op::RestartOk,
            0xFF => Op::Error,
            _ => return None,
        })
    }

    /// The name used in the documentation and in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Op::Hello => "HELLO",
            Op::FetchSb => "FETCH_SB",
            Op::Read => "READ",
            Op::ReadBatch => "READ_BATCH",
            Op::Write => "WRITE",
            Op::Lock => "LOCK",
            Op::Unlock => "UNLOCK",
            Op::Regs => "REGS",
            Op::RdmaConnect => "RDMA_CONNECT",
            Op::Status => "STATUS",
            Op::Restart => "RESTART",
            Op::HelloOk => "HELLO reply",
            Op::FetchSbOk => "FETCH_SB reply",
            Op::ReadOk => "READ reply",
            Op::ReadBatchOk => "READ_BATCH reply",
            Op::WriteOk => "WRITE reply",
            Op::LockOk => "LOCK reply",
            Op::UnlockOk => "UNLOCK reply",
            Op::RegsOk => "REGS reply",
            Op::RdmaConnectOk => "RDMA_CONNECT reply",
            Op::StatusOk => "STATUS reply",
            Op::RestartOk => "RESTART reply",
            Op::Error => "ERROR",
        }
    }
}

/// A guest-physical range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Range {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A vCPU's registers as carried by the `REGS` reply: bdvmm's own register type.
pub use bdvmm_api::VcpuRegs as Regs;

/// The VM's run state, as bdvmm reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmStatus {
    /// [`VM_RUNNING`], [`VM_PAUSED`] or [`VM_STOPPED`].
    pub state: u8,
    /// vCPUs.
    pub vcpus: u8,
    /// Milliseconds since the VM started.
    pub uptime_ms: u64,
    /// Pauses so far (by anyone).
    pub pauses: u64,
}

/// [`VmStatus::state`]: the vCPUs run.
pub const VM_RUNNING: u8 = 0;
/// [`VmStatus::state`]: the vCPUs are paused.
pub const VM_PAUSED: u8 = 1;
/// [`VmStatus::state`]: the VM is stopping or stopped.
pub const VM_STOPPED: u8 = 2;
/// Largest RDMA_CONNECT payload.
pub const MAX_RDMA_BLOB: usize = 4096;

/// Monitor → bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Authentication placeholder: who the monitor says it is, and a fresh nonce.
    Hello {
        /// Monitor id, UTF-8, 1..=[`MAX_MONITOR_ID`] bytes.
        monitor_id: String,
        /// Nonce chosen by the monitor.
        nonce: u64,
    },
    /// Fetch a consistent snapshot of the Sensor Box.
    FetchSb,
    /// Read one guest-physical range.
    Read(Range),
    /// Read up to [`MAX_BATCH_RANGES`] ranges in one round trip.
    ReadBatch(Vec<Range>),
    /// Write bytes at a guest-physical address.
    Write {
        /// Start address.
        gpa: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Pause the guest, holding the lock for at most `lease_ms` unless renewed.
    Lock {
        /// Lease in milliseconds.
        lease_ms: u32,
    },
    /// Release the lock.
    Unlock,
    /// Read one vCPU's registers.
    Regs {
        /// vCPU index.
        vcpu: u8,
    },
    /// The monitor's RDMA endpoint (opaque here; see `rdma_bridge::verbs::connect`), at most
    /// [`MAX_RDMA_BLOB`] bytes.
    RdmaConnect(Vec<u8>),
    /// The VM's run state.
    Status,
    /// Restart the guest in place (a monitor's last resort for a hung guest).
    Restart,
}

/// Bridge → monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `HELLO` accepted.
    Hello {
        /// The bridge's nonce.
        nonce: u64,
        /// Guest-physical start of the VM's backdoor range (the Sensor Box is at its start).
        backdoor_gpa: u64,
        /// Its size.
        backdoor_size: u64,
    },
    /// The Sensor Box bytes.
    SensorBox(Vec<u8>),
    /// The bytes of a `READ`.
    Read(Vec<u8>),
    /// The bytes of each range of a `READ_BATCH`, in request order.
    ReadBatch(Vec<Vec<u8>>),
    /// `WRITE` done.
    Write,
    /// The guest is paused.
    Lock {
        /// Nanoseconds until every vCPU acknowledged the pause.
        lock_ns: u64,
    },
    /// The guest runs again.
    Unlock,
    /// A vCPU's registers.
    Regs(Regs),
    /// The bridge's RDMA endpoint and regions (opaque here; see `rdma_bridge::verbs::connect`).
    RdmaConnect(Vec<u8>),
    /// The VM's run state.
    Status(VmStatus),
    /// The guest is rebooting.
    Restart,
    /// The request failed.
    Error {
        /// One of [`code`] (or a newer code).
        code: u16,
        /// Human-readable, UTF-8, ≤ [`MAX_ERROR_MESSAGE`] bytes.
        message: String,
    },
}

/// The content of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Monitor → bridge.
    Request(Request),
    /// Bridge → monitor.
    Reply(Reply),
}

/// One frame: a request id and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Chosen by the monitor, echoed by the reply.
    pub request_id: u64,
    /// What the frame says.
    pub message: Message,
}

impl Frame {
    /// A request frame.
    pub fn request(request_id: u64, request: Request) -> Self {
        Frame {
            request_id,
            message: Message::Request(request),
        }
    }

    /// A reply frame.
    pub fn reply(request_id: u64, reply: Reply) -> Self {
        Frame {
            request_id,
            message: Message::Reply(reply),
        }
    }

    /// The frame's op code.
    pub fn op(&self) -> Op {
        match &self.message {
            Message::Request(r) => match r {
                Request::Hello { .. } => Op::Hello,
                Request::FetchSb => Op::FetchSb,
                Request::Read(_) => Op::Read,
                Request::ReadBatch(_) => Op::ReadBatch,
                Request::Write { .. } => Op::Write,
                Request::Lock { .. } => Op::Lock,
                Request::Unlock => Op::Unlock,
                Request::Regs { .. } => Op::Regs,
                Request::RdmaConnect(_) => Op::RdmaConnect,
                Request::Status => Op::Status,
                Request::Restart => Op::Restart,
            },
            Message::Reply(r) => match r {
                Reply::Hello { .. } => Op::HelloOk,
                Reply::SensorBox(_) => Op::FetchSbOk,
                Reply::Read(_) => Op::ReadOk,
                Reply::ReadBatch(_) => Op::ReadBatchOk,
                Reply::Write => Op::WriteOk,
                Reply::Lock { .. } => Op::LockOk,
                Reply::Unlock => Op::UnlockOk,
                Reply::Regs(_) => Op::RegsOk,
                Reply::RdmaConnect(_) => Op::RdmaConnectOk,
                Reply::Status(_) => Op::StatusOk,
                Reply::Restart => Op::RestartOk,
                Reply::Error { .. } => Op::Error,
            },
        }
    }

    /// Appends the encoded frame to `out`. On error `out` is left as it was.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let op = self.op();
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        if let Err(e) = encode_payload(&self.message, op, out) {
            out.truncate(start);
            return Err(e);
        }
        let payload_len = out.len() - start - HEADER_LEN;
        let payload_len = match u32::try_from(payload_len) {
            Ok(n) if n <= MAX_PAYLOAD => n,
            _ => {
                out.truncate(start);
                return Err(WireError::PayloadTooLarge {
                    len: payload_len as u64,
                    max: MAX_PAYLOAD,
                });
            }
        };
        let header = Header {
            version: VERSION,
            op: op as u8,
            flags: 0,
            request_id: self.request_id,
            payload_len,
        };
        out[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
        Ok(())
    }
}

mod decoder;
mod payload;
#[cfg(test)]
mod tests;

pub use decoder::{decode, encode, Decoder, Header};
pub use payload::decode_payload;
use payload::encode_payload;
