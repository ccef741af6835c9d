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
//! | `0x09` | `RDMA_CONNECT` | the monitor's RDMA endpoint, an opaque blob of at most [`MAX_RDMA_BLOB`] bytes (format in [`crate::verbs::connect`]) |
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
    /// The monitor's RDMA endpoint (opaque here; see [`crate::verbs::connect`]), at most
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
    /// The bridge's RDMA endpoint and regions (opaque here; see [`crate::verbs::connect`]).
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

/// Encodes one frame.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    frame.encode_into(&mut out)?;
    Ok(out)
}

/// Decodes exactly one complete frame: fewer bytes are [`WireError::Truncated`], more are
/// [`WireError::TrailingBytes`].
pub fn decode(bytes: &[u8]) -> Result<Frame, WireError> {
    let mut d = Decoder::new();
    // The decoder's buffer limit would reject an oversized input before looking at it; check the
    // header first so the error names the real problem.
    let header = match bytes.first_chunk::<HEADER_LEN>() {
        Some(h) => Header::parse(h, MAX_PAYLOAD)?,
        None => {
            check_magic_prefix(bytes)?;
            return Err(WireError::Truncated {
                need: HEADER_LEN,
                have: bytes.len(),
            });
        }
    };
    let total = header.frame_len();
    if bytes.len() < total {
        return Err(WireError::Truncated {
            need: total,
            have: bytes.len(),
        });
    }
    if bytes.len() > total {
        return Err(WireError::TrailingBytes {
            op: Op::from_u8(header.op).map_or("?", Op::name),
            where_: "frame",
            extra: bytes.len() - total,
        });
    }
    d.push(bytes)?;
    match d.next_frame()? {
        Some(f) => Ok(f),
        // Unreachable in practice: the whole frame was pushed.
        None => Err(WireError::Truncated {
            need: total,
            have: bytes.len(),
        }),
    }
}

/// The fixed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version.
    pub version: u8,
    /// Op code (raw).
    pub op: u8,
    /// Flags (reserved).
    pub flags: u16,
    /// Request id.
    pub request_id: u64,
    /// Payload length.
    pub payload_len: u32,
}

impl Header {
    /// Parses and validates a header: magic, version, op, flags and `payload_len ≤ max_payload`.
    pub fn parse(b: &[u8; HEADER_LEN], max_payload: u32) -> Result<Header, WireError> {
        let mut c = Cursor::new(b, "header");
        let magic = c.u32()?;
        if magic != MAGIC {
            return Err(WireError::BadMagic { found: magic });
        }
        let h = Header {
            version: c.u8()?,
            op: c.u8()?,
            flags: c.u16()?,
            request_id: c.u64()?,
            payload_len: c.u32()?,
        };
        if h.version != VERSION {
            return Err(WireError::UnsupportedVersion { version: h.version });
        }
        if Op::from_u8(h.op).is_none() {
            return Err(WireError::UnknownOp { op: h.op });
        }
        if h.flags != 0 {
            return Err(WireError::ReservedFlags { flags: h.flags });
        }
        if h.payload_len > max_payload {
            return Err(WireError::PayloadTooLarge {
                len: u64::from(h.payload_len),
                max: max_payload,
            });
        }
        Ok(h)
    }

    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC_BYTES);
        b[4] = self.version;
        b[5] = self.op;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Header plus payload, in bytes.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// Rejects a stream whose first bytes (fewer than 4 allowed) already differ from the magic.
fn check_magic_prefix(bytes: &[u8]) -> Result<(), WireError> {
    let n = bytes.len().min(MAGIC_BYTES.len());
    if bytes[..n] != MAGIC_BYTES[..n] {
        let mut found = [0u8; 4];
        found[..n].copy_from_slice(&bytes[..n]);
        return Err(WireError::BadMagic {
            found: u32::from_le_bytes(found),
        });
    }
    Ok(())
}

/// A streaming frame decoder: push bytes in any chunks, take complete frames out.
///
/// Memory is bounded by `max_buffered` (default: one maximal frame plus [`DEFAULT_SLACK`]); a caller
/// that drains every available frame after each push and pushes chunks of at most the slack never
/// hits the limit with a well-behaved peer. The buffer grows only as bytes arrive, never to a size
/// announced by the peer, so a peer that declares 16 MiB and stops costs only what it sent.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    max_payload: u32,
    max_buffered: usize,
    poisoned: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder with the protocol's limits.
    pub fn new() -> Self {
        Self::with_limits(
            MAX_PAYLOAD,
            HEADER_LEN + MAX_PAYLOAD as usize + DEFAULT_SLACK,
        )
    }

    /// A decoder with tighter limits. `max_payload` is capped at [`MAX_PAYLOAD`]; `max_buffered` is
    /// raised to at least one frame of `max_payload`.
    pub fn with_limits(max_payload: u32, max_buffered: usize) -> Self {
        let max_payload = max_payload.min(MAX_PAYLOAD);
        Decoder {
            buf: Vec::new(),
            max_payload,
            max_buffered: max_buffered.max(HEADER_LEN + max_payload as usize),
            poisoned: false,
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether an earlier error left the stream out of sync.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) -> Result<(), WireError> {
        if self.poisoned {
            return Err(WireError::Poisoned);
        }
        let want = self.buf.len().saturating_add(data.len());
        if want > self.max_buffered {
            self.poisoned = true;
            return Err(WireError::BufferFull {
                buffered: want,
                limit: self.max_buffered,
            });
        }
        if want > self.buf.capacity() {
            // Grow geometrically, but never past what is needed for the frame in progress (when its
            // header is known and valid) or the buffer limit: no allocation exceeds the checked size.
            let mut bound = self.max_buffered;
            if let Some(h) = self.buf.first_chunk::<HEADER_LEN>() {
                if let Ok(h) = Header::parse(h, self.max_payload) {
                    bound = bound.min(h.frame_len().max(want));
                }
            }
            let target = want.max(self.buf.capacity().saturating_mul(2).min(bound));
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. Any error poisons the decoder.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.poisoned {
            return Err(WireError::Poisoned);
        }
        let r = self.try_next();
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn try_next(&mut self) -> Result<Option<Frame>, WireError> {
        let Some(h) = self.buf.first_chunk::<HEADER_LEN>() else {
            check_magic_prefix(&self.buf)?;
            return Ok(None);
        };
        let header = Header::parse(h, self.max_payload)?;
        let total = header.frame_len();
        let Some(payload) = self.buf.get(HEADER_LEN..total) else {
            return Ok(None);
        };
        let message = decode_payload(header.op, payload)?;
        self.buf.drain(..total);
        Ok(Some(Frame {
            request_id: header.request_id,
            message,
        }))
    }
}

/// Reads little-endian fields from a payload; every shortfall is a [`WireError::Malformed`].
struct Cursor<'a> {
    rest: &'a [u8],
    op: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(rest: &'a [u8], op: &'static str) -> Self {
        Cursor { rest, op }
    }

    fn take<const N: usize>(&mut self, field: &str) -> Result<[u8; N], WireError> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(*head)
            }
            None => Err(self.short(field, N)),
        }
    }

    fn short(&self, field: &str, need: usize) -> WireError {
        WireError::Malformed {
            op: self.op,
            what: format!("{field} needs {need} bytes, only {} left", self.rest.len()),
        }
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take::<1>("u8")?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take("u16")?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take("u32")?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take("u64")?))
    }

    fn bytes(&mut self, n: usize, field: &str) -> Result<&'a [u8], WireError> {
        if n > self.rest.len() {
            return Err(self.short(field, n));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn finish(self) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                op: self.op,
                where_: "payload",
                extra: self.rest.len(),
            })
        }
    }
}

fn check_range(gpa: u64, len: u64) -> Result<(), WireError> {
    if gpa.checked_add(len).is_none() {
        return Err(WireError::RangeOverflow { gpa, len });
    }
    Ok(())
}

fn check_read(r: Range) -> Result<(), WireError> {
    if r.len > MAX_READ_LEN {
        return Err(WireError::ReadTooLarge {
            len: u64::from(r.len),
        });
    }
    check_range(r.gpa, u64::from(r.len))
}

/// Checks a batch of ranges: count, each range, and that the reply fits in one frame.
fn check_batch(ranges: &[Range]) -> Result<(), WireError> {
    if ranges.len() > usize::from(MAX_BATCH_RANGES) {
        return Err(WireError::TooManyRanges {
            count: ranges.len(),
        });
    }
    let mut reply = 2u64;
    for r in ranges {
        check_read(*r)?;
        reply += 4 + u64::from(r.len);
    }
    if reply > u64::from(MAX_PAYLOAD) {
        return Err(WireError::ReadTooLarge { len: reply });
    }
    Ok(())
}

fn check_string(s: &[u8], field: &'static str, max: usize) -> Result<(), WireError> {
    if s.len() > max {
        return Err(WireError::StringTooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

fn check_monitor_id(id: &[u8]) -> Result<(), WireError> {
    if id.is_empty() {
        return Err(WireError::Malformed {
            op: Op::Hello.name(),
            what: "monitor id is empty".into(),
        });
    }
    check_string(id, "monitor id", MAX_MONITOR_ID)
}

fn check_payload_len(len: usize) -> Result<(), WireError> {
    if len > MAX_PAYLOAD as usize {
        return Err(WireError::PayloadTooLarge {
            len: len as u64,
            max: MAX_PAYLOAD,
        });
    }
    Ok(())
}

fn encode_payload(m: &Message, op: Op, out: &mut Vec<u8>) -> Result<(), WireError> {
    match m {
        Message::Request(r) => match r {
            Request::Hello { monitor_id, nonce } => {
                check_monitor_id(monitor_id.as_bytes())?;
                out.extend_from_slice(&nonce.to_le_bytes());
                // check_monitor_id bounds the length to 64, so it fits a u8.
                out.push(monitor_id.len() as u8);
                out.extend_from_slice(monitor_id.as_bytes());
            }
            Request::FetchSb | Request::Unlock | Request::Status | Request::Restart => {}
            Request::RdmaConnect(b) => put_blob(out, b)?,
            Request::Read(r) => {
                check_read(*r)?;
                put_range(out, *r);
            }
            Request::ReadBatch(ranges) => {
                check_batch(ranges)?;
                // check_batch bounds the count to 256.
                out.extend_from_slice(&(ranges.len() as u16).to_le_bytes());
                for r in ranges {
                    put_range(out, *r);
                }
            }
            Request::Write { gpa, bytes } => {
                check_payload_len(bytes.len().saturating_add(8))?;
                check_range(*gpa, bytes.len() as u64)?;
                out.extend_from_slice(&gpa.to_le_bytes());
                out.extend_from_slice(bytes);
            }
            Request::Lock { lease_ms } => out.extend_from_slice(&lease_ms.to_le_bytes()),
            Request::Regs { vcpu } => out.push(*vcpu),
        },
        Message::Reply(r) => match r {
            Reply::Hello {
                nonce,
                backdoor_gpa,
                backdoor_size,
            } => {
                out.extend_from_slice(&nonce.to_le_bytes());
                out.extend_from_slice(&backdoor_gpa.to_le_bytes());
                out.extend_from_slice(&backdoor_size.to_le_bytes());
            }
            Reply::SensorBox(b) | Reply::Read(b) => {
                check_payload_len(b.len())?;
                out.extend_from_slice(b);
            }
            Reply::ReadBatch(parts) => {
                if parts.len() > usize::from(MAX_BATCH_RANGES) {
                    return Err(WireError::TooManyRanges { count: parts.len() });
                }
                let total = parts.iter().fold(2usize, |acc, p| {
                    acc.saturating_add(4).saturating_add(p.len())
                });
                check_payload_len(total)?;
                out.extend_from_slice(&(parts.len() as u16).to_le_bytes());
                for p in parts {
                    // total ≤ MAX_PAYLOAD, so each part's length fits a u32.
                    out.extend_from_slice(&(p.len() as u32).to_le_bytes());
                    out.extend_from_slice(p);
                }
            }
            Reply::Write | Reply::Unlock | Reply::Restart => {}
            Reply::Lock { lock_ns } => out.extend_from_slice(&lock_ns.to_le_bytes()),
            Reply::Regs(regs) => put_regs(out, regs, op)?,
            Reply::RdmaConnect(b) => put_blob(out, b)?,
            Reply::Status(st) => {
                if st.state > 2 {
                    return Err(WireError::Malformed {
                        op: op.name(),
                        what: format!("status state {} is not 0..=2", st.state),
                    });
                }
                out.push(st.state);
                out.push(st.vcpus);
                out.extend_from_slice(&st.uptime_ms.to_le_bytes());
                out.extend_from_slice(&st.pauses.to_le_bytes());
            }
            Reply::Error { code, message } => {
                check_string(message.as_bytes(), "error message", MAX_ERROR_MESSAGE)?;
                out.extend_from_slice(&code.to_le_bytes());
                out.extend_from_slice(message.as_bytes());
            }
        },
    }
    Ok(())
}

fn put_range(out: &mut Vec<u8>, r: Range) {
    out.extend_from_slice(&r.gpa.to_le_bytes());
    out.extend_from_slice(&r.len.to_le_bytes());
}

fn put_blob(out: &mut Vec<u8>, b: &[u8]) -> Result<(), WireError> {
    if b.is_empty() || b.len() > MAX_RDMA_BLOB {
        return Err(WireError::Malformed {
            op: Op::RdmaConnect.name(),
            what: format!("blob of {} bytes is not 1..={MAX_RDMA_BLOB}", b.len()),
        });
    }
    out.extend_from_slice(b);
    Ok(())
}

fn get_blob(c: &mut Cursor<'_>, op: Op) -> Result<Vec<u8>, WireError> {
    let b = c.rest();
    if b.is_empty() || b.len() > MAX_RDMA_BLOB {
        return Err(WireError::Malformed {
            op: op.name(),
            what: format!("blob of {} bytes is not 1..={MAX_RDMA_BLOB}", b.len()),
        });
    }
    Ok(b.to_vec())
}

fn put_regs(out: &mut Vec<u8>, r: &Regs, op: Op) -> Result<(), WireError> {
    if r.cpl > 3 {
        return Err(WireError::Malformed {
            op: op.name(),
            what: format!("cpl {} is not 0..=3", r.cpl),
        });
    }
    for v in [
        r.rip,
        r.rsp,
        r.rflags,
        r.cr0,
        r.cr2,
        r.cr3,
        r.cr4,
        r.efer,
        r.fs_base,
        r.gs_base,
        r.kernel_gs_base.unwrap_or(0),
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.push(r.cpl);
    out.push(u8::from(r.kernel_gs_base.is_some()));
    Ok(())
}

/// Decodes the payload of a frame whose header has been validated (`payload.len()` ≤ the limit).
fn decode_payload(op: u8, payload: &[u8]) -> Result<Message, WireError> {
    let op = Op::from_u8(op).ok_or(WireError::UnknownOp { op })?;
    let mut c = Cursor::new(payload, op.name());
    let m = match op {
        Op::Hello => {
            let nonce = c.u64()?;
            let len = usize::from(c.u8()?);
            let id = c.bytes(len, "monitor id")?;
            check_monitor_id(id)?;
            let monitor_id = std::str::from_utf8(id)
                .map_err(|_| WireError::InvalidUtf8 {
                    field: "monitor id",
                })?
                .to_owned();
            Message::Request(Request::Hello { monitor_id, nonce })
        }
        Op::FetchSb => Message::Request(Request::FetchSb),
        Op::Read => {
            let r = Range {
                gpa: c.u64()?,
                len: c.u32()?,
            };
            check_read(r)?;
            Message::Request(Request::Read(r))
        }
        Op::ReadBatch => {
            let count = c.u16()?;
            if count > MAX_BATCH_RANGES {
                return Err(WireError::TooManyRanges {
                    count: usize::from(count),
                });
            }
            let need = usize::from(count) * 12;
            if c.remaining() != need {
                return Err(WireError::Malformed {
                    op: op.name(),
                    what: format!(
                        "{count} ranges need {need} bytes, payload has {}",
                        c.remaining()
                    ),
                });
            }
            let mut ranges = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                ranges.push(Range {
                    gpa: c.u64()?,
                    len: c.u32()?,
                });
            }
            check_batch(&ranges)?;
            Message::Request(Request::ReadBatch(ranges))
        }
        Op::Write => {
            let gpa = c.u64()?;
            let bytes = c.rest();
            check_range(gpa, bytes.len() as u64)?;
            Message::Request(Request::Write {
                gpa,
                bytes: bytes.to_vec(),
            })
        }
        Op::Lock => Message::Request(Request::Lock { lease_ms: c.u32()? }),
        Op::Unlock => Message::Request(Request::Unlock),
        Op::Regs => Message::Request(Request::Regs { vcpu: c.u8()? }),
        Op::RdmaConnect => Message::Request(Request::RdmaConnect(get_blob(&mut c, op)?)),
        Op::Status => Message::Request(Request::Status),
        Op::Restart => Message::Request(Request::Restart),
        Op::RestartOk => Message::Reply(Reply::Restart),
        Op::HelloOk => Message::Reply(Reply::Hello {
            nonce: c.u64()?,
            backdoor_gpa: c.u64()?,
            backdoor_size: c.u64()?,
        }),
        Op::FetchSbOk => Message::Reply(Reply::SensorBox(c.rest().to_vec())),
        Op::ReadOk => Message::Reply(Reply::Read(c.rest().to_vec())),
        Op::ReadBatchOk => {
            let count = c.u16()?;
            if count > MAX_BATCH_RANGES {
                return Err(WireError::TooManyRanges {
                    count: usize::from(count),
                });
            }
            let mut parts = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                let len = c.u32()? as usize;
                // Bounded by the (checked) payload: Cursor::bytes refuses lengths past its end.
                parts.push(c.bytes(len, "range bytes")?.to_vec());
            }
            Message::Reply(Reply::ReadBatch(parts))
        }
        Op::WriteOk => Message::Reply(Reply::Write),
        Op::LockOk => Message::Reply(Reply::Lock { lock_ns: c.u64()? }),
        Op::UnlockOk => Message::Reply(Reply::Unlock),
        Op::RegsOk => Message::Reply(Reply::Regs(get_regs(&mut c, op)?)),
        Op::RdmaConnectOk => Message::Reply(Reply::RdmaConnect(get_blob(&mut c, op)?)),
        Op::StatusOk => {
            let state = c.u8()?;
            if state > 2 {
                return Err(WireError::Malformed {
                    op: op.name(),
                    what: format!("status state {state} is not 0..=2"),
                });
            }
            Message::Reply(Reply::Status(VmStatus {
                state,
                vcpus: c.u8()?,
                uptime_ms: c.u64()?,
                pauses: c.u64()?,
            }))
        }
        Op::Error => {
            let code = c.u16()?;
            let msg = c.rest();
            check_string(msg, "error message", MAX_ERROR_MESSAGE)?;
            let message = std::str::from_utf8(msg)
                .map_err(|_| WireError::InvalidUtf8 {
                    field: "error message",
                })?
                .to_owned();
            Message::Reply(Reply::Error { code, message })
        }
    };
    c.finish()?;
    Ok(m)
}

fn get_regs(c: &mut Cursor<'_>, op: Op) -> Result<Regs, WireError> {
    let mut v = [0u64; 11];
    for x in &mut v {
        *x = c.u64()?;
    }
    let [rip, rsp, rflags, cr0, cr2, cr3, cr4, efer, fs_base, gs_base, kgs] = v;
    let cpl = c.u8()?;
    let has_kgs = c.u8()?;
    if cpl > 3 {
        return Err(WireError::Malformed {
            op: op.name(),
            what: format!("cpl {cpl} is not 0..=3"),
        });
    }
    let kernel_gs_base = match (has_kgs, kgs) {
        (1, k) => Some(k),
        (0, 0) => None,
        (0, _) => {
            return Err(WireError::Malformed {
                op: op.name(),
                what: "kernel_gs_base is marked absent but not 0".into(),
            })
        }
        (f, _) => {
            return Err(WireError::Malformed {
                op: op.name(),
                what: format!("kernel_gs_base presence byte is {f}, not 0 or 1"),
            })
        }
    };
    Ok(Regs {
        rip,
        rsp,
        rflags,
        cr0,
        cr2,
        cr3,
        cr4,
        efer,
        fs_base,
        gs_base,
        kernel_gs_base,
        cpl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Records the largest single allocation made by the current thread, so tests can check that
    /// the decoder never allocates more than the bytes it was given.
    struct TrackMax;

    thread_local! {
        static MAX_ALLOC: Cell<usize> = const { Cell::new(0) };
    }

    fn note(size: usize) {
        let _ = MAX_ALLOC.try_with(|m| m.set(m.get().max(size)));
    }

    // SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping only touches
    // a const-initialised thread-local Cell, which neither allocates nor unwinds.
    unsafe impl GlobalAlloc for TrackMax {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: same contract as our caller's.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: same contract as our caller's.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: same contract as our caller's.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            // SAFETY: same contract as our caller's.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOC: TrackMax = TrackMax;

    fn reset_max_alloc() {
        MAX_ALLOC.with(|m| m.set(0));
    }
    fn max_alloc() -> usize {
        MAX_ALLOC.with(|m| m.get())
    }

    /// A small deterministic PRNG (xorshift64*), so the random tests need no dependency.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn regs() -> Regs {
        Regs {
            rip: 0xffff_ffff_8100_0000,
            rsp: 0xffff_c900_0000_3f00,
            rflags: 0x246,
            cr0: 0x8005_0033,
            cr2: 0x7f00_dead_b000,
            cr3: 0x260_a000,
            cr4: 0x3606f0,
            efer: 0xd01,
            fs_base: 0x7f12_3456_7000,
            gs_base: 0xffff_8880_7fc0_0000,
            kernel_gs_base: Some(0x20),
            cpl: 0,
        }
    }

    /// One frame of every variant (and a few edge cases).
    fn samples() -> Vec<Frame> {
        let mut batch_parts = vec![vec![1u8, 2, 3], Vec::new()];
        batch_parts.push((0..=255u8).collect());
        vec![
            Frame::request(
                1,
                Request::Hello {
                    monitor_id: "monitor-a".into(),
                    nonce: 0x0123_4567_89ab_cdef,
                },
            ),
            Frame::request(
                2,
                Request::Hello {
                    monitor_id: "é".repeat(32),
                    nonce: 0,
                },
            ),
            Frame::request(3, Request::FetchSb),
            Frame::request(
                4,
                Request::Read(Range {
                    gpa: 0x10_0000,
                    len: 4096,
                }),
            ),
            Frame::request(5, Request::ReadBatch(Vec::new())),
            Frame::request(
                6,
                Request::ReadBatch(
                    (0..256)
                        .map(|i| Range {
                            gpa: i * 0x1000,
                            len: 64,
                        })
                        .collect(),
                ),
            ),
            Frame::request(
                7,
                Request::Write {
                    gpa: 0xf0_0000,
                    bytes: vec![9, 8, 7],
                },
            ),
            Frame::request(
                8,
                Request::Write {
                    gpa: u64::MAX,
                    bytes: Vec::new(),
                },
            ),
            Frame::request(9, Request::Lock { lease_ms: 500 }),
            Frame::request(10, Request::Unlock),
            Frame::request(11, Request::Regs { vcpu: 3 }),
            Frame::request(12, Request::Status),
            Frame::request(14, Request::Restart),
            Frame::request(13, Request::RdmaConnect(vec![1, 2, 3])),
            Frame::reply(
                1,
                Reply::Hello {
                    nonce: 42,
                    backdoor_gpa: 0xf0_0000,
                    backdoor_size: 1 << 20,
                },
            ),
            Frame::reply(3, Reply::SensorBox(vec![0xab; 1000])),
            Frame::reply(4, Reply::Read(vec![0x5a; 4096])),
            Frame::reply(4, Reply::Read(Vec::new())),
            Frame::reply(6, Reply::ReadBatch(batch_parts)),
            Frame::reply(6, Reply::ReadBatch(Vec::new())),
            Frame::reply(7, Reply::Write),
            Frame::reply(9, Reply::Lock { lock_ns: 123_456 }),
            Frame::reply(10, Reply::Unlock),
            Frame::reply(11, Reply::Regs(regs())),
            Frame::reply(
                12,
                Reply::Status(VmStatus {
                    state: VM_PAUSED,
                    vcpus: 2,
                    uptime_ms: 5,
                    pauses: 9,
                }),
            ),
            Frame::reply(13, Reply::RdmaConnect(vec![9; MAX_RDMA_BLOB])),
            Frame::reply(14, Reply::Restart),
            Frame::reply(
                11,
                Reply::Regs(Regs {
                    kernel_gs_base: None,
                    cpl: 3,
                    ..regs()
                }),
            ),
            Frame::reply(
                u64::MAX,
                Reply::Error {
                    code: code::DENIED,
                    message: "write outside the granted ranges".into(),
                },
            ),
            Frame::reply(
                0,
                Reply::Error {
                    code: 0xffff,
                    message: "x".repeat(MAX_ERROR_MESSAGE),
                },
            ),
        ]
    }

    /// A raw frame with a chosen header.
    fn raw(version: u8, op: u8, flags: u16, payload: &[u8]) -> Vec<u8> {
        let h = Header {
            version,
            op,
            flags,
            request_id: 77,
            payload_len: payload.len() as u32,
        };
        let mut v = h.to_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn req(op: Op, payload: &[u8]) -> Vec<u8> {
        raw(VERSION, op as u8, 0, payload)
    }

    #[test]
    fn round_trip_every_variant() {
        for f in samples() {
            let bytes = encode(&f).unwrap();
            assert_eq!(
                bytes.len(),
                HEADER_LEN + u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize
            );
            assert_eq!(decode(&bytes).unwrap(), f, "{f:?}");
        }
    }

    #[test]
    fn every_op_is_sampled() {
        let mut ops: Vec<u8> = samples().iter().map(|f| f.op() as u8).collect();
        ops.sort_unstable();
        ops.dedup();
        let all: Vec<u8> = (0..=255u8).filter(|b| Op::from_u8(*b).is_some()).collect();
        assert_eq!(ops, all);
        for op in all {
            assert_eq!(Op::from_u8(op).unwrap() as u8, op);
        }
    }

    #[test]
    fn header_layout_is_as_documented() {
        let f = Frame::request(
            0x1122_3344_5566_7788,
            Request::Read(Range {
                gpa: 0xaabb,
                len: 0x10,
            }),
        );
        let b = encode(&f).unwrap();
        let mut want = b"BDBR".to_vec();
        want.extend_from_slice(&[1, 0x03, 0, 0]);
        want.extend_from_slice(&[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        want.extend_from_slice(&[12, 0, 0, 0]);
        want.extend_from_slice(&[0xbb, 0xaa, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]);
        assert_eq!(b, want);
        assert_eq!(MAGIC, 0x5242_4442);
        let regs = encode(&Frame::reply(0, Reply::Regs(regs()))).unwrap();
        assert_eq!(regs.len(), HEADER_LEN + REGS_LEN);
        assert_eq!(
            &regs[HEADER_LEN + 40..HEADER_LEN + 48],
            &0x260_a000u64.to_le_bytes()
        );
        assert_eq!(&regs[HEADER_LEN + 88..], &[0, 1]);
    }

    #[test]
    fn stream_byte_by_byte() {
        let frames = samples();
        let mut stream = Vec::new();
        for f in &frames {
            f.encode_into(&mut stream).unwrap();
        }
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for b in &stream {
            d.push(std::slice::from_ref(b)).unwrap();
            while let Some(f) = d.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn stream_random_chunks() {
        let frames = samples();
        let mut stream = Vec::new();
        for f in &frames {
            f.encode_into(&mut stream).unwrap();
        }
        let mut rng = XorShift(0x5eed);
        for _ in 0..50 {
            let mut d = Decoder::new();
            let mut out = Vec::new();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let n = 1 + rng.below(rest.len().min(5000));
                let (chunk, tail) = rest.split_at(n);
                rest = tail;
                d.push(chunk).unwrap();
                while let Some(f) = d.next_frame().unwrap() {
                    out.push(f);
                }
            }
            assert_eq!(out, frames);
        }
    }

    #[test]
    fn peer_stopping_mid_frame_yields_nothing() {
        let b = encode(&Frame::reply(1, Reply::Read(vec![1; 100]))).unwrap();
        for cut in 0..b.len() {
            let mut d = Decoder::new();
            d.push(&b[..cut]).unwrap();
            assert_eq!(d.next_frame(), Ok(None), "cut at {cut}");
            assert_eq!(d.next_frame(), Ok(None), "asking again is harmless");
            assert_eq!(d.buffered(), cut);
            assert!(matches!(
                decode(&b[..cut]),
                Err(WireError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn huge_declared_payload_allocates_only_what_arrived() {
        // A valid header announcing the maximal payload, followed by a little of it.
        let mut b = Header {
            version: VERSION,
            op: Op::Write as u8,
            flags: 0,
            request_id: 1,
            payload_len: MAX_PAYLOAD,
        }
        .to_bytes()
        .to_vec();
        b.extend_from_slice(&[0; 100]);
        reset_max_alloc();
        let mut d = Decoder::new();
        for chunk in b.chunks(7) {
            d.push(chunk).unwrap();
            assert_eq!(d.next_frame(), Ok(None));
        }
        assert!(max_alloc() < 4096, "allocated {} bytes", max_alloc());

        // A complete large frame, fed in small chunks: no allocation beyond the frame's size.
        let f = Frame::request(
            2,
            Request::Write {
                gpa: 0,
                bytes: vec![7; 1 << 20],
            },
        );
        let b = encode(&f).unwrap();
        let mut d = Decoder::new();
        reset_max_alloc();
        let mut got = None;
        for chunk in b.chunks(1000) {
            d.push(chunk).unwrap();
            if let Some(x) = d.next_frame().unwrap() {
                got = Some(x);
            }
        }
        assert!(
            max_alloc() <= b.len(),
            "allocated {} > {}",
            max_alloc(),
            b.len()
        );
        assert_eq!(got, Some(f));
    }

    #[test]
    fn error_bad_magic() {
        let mut b = req(Op::FetchSb, &[]);
        b[0] = b'X';
        assert!(matches!(decode(&b), Err(WireError::BadMagic { .. })));
        // Detected as soon as the first wrong byte arrives, not after a whole header.
        let mut d = Decoder::new();
        d.push(b"BX").unwrap();
        assert!(matches!(d.next_frame(), Err(WireError::BadMagic { .. })));
        assert!(matches!(
            decode(b"GET / HTTP/1.1\r\n"),
            Err(WireError::BadMagic { .. })
        ));
    }

    #[test]
    fn error_unsupported_version() {
        let b = raw(2, Op::FetchSb as u8, 0, &[]);
        assert_eq!(
            decode(&b),
            Err(WireError::UnsupportedVersion { version: 2 })
        );
    }

    #[test]
    fn error_unknown_op() {
        for op in [0u8, 0x0c, 0x80, 0x8c, 0xfe] {
            assert_eq!(
                decode(&raw(VERSION, op, 0, &[])),
                Err(WireError::UnknownOp { op })
            );
        }
    }

    #[test]
    fn error_reserved_flags() {
        let b = raw(VERSION, Op::Unlock as u8, 0x8000, &[]);
        assert_eq!(decode(&b), Err(WireError::ReservedFlags { flags: 0x8000 }));
    }

    #[test]
    fn error_payload_too_large() {
        let h = Header {
            version: VERSION,
            op: Op::Write as u8,
            flags: 0,
            request_id: 0,
            payload_len: MAX_PAYLOAD + 1,
        };
        assert!(matches!(
            decode(&h.to_bytes()),
            Err(WireError::PayloadTooLarge { .. })
        ));
        let mut d = Decoder::new();
        d.push(&h.to_bytes()).unwrap();
        assert!(matches!(
            d.next_frame(),
            Err(WireError::PayloadTooLarge { .. })
        ));
        // A decoder with a tighter limit rejects smaller frames.
        let mut d = Decoder::with_limits(16, 0);
        d.push(&req(Op::Write, &[0; 17])[..HEADER_LEN]).unwrap();
        assert_eq!(
            d.next_frame(),
            Err(WireError::PayloadTooLarge { len: 17, max: 16 })
        );
        // Encoding refuses what decoding would.
        let w = Frame::request(
            0,
            Request::Write {
                gpa: 0,
                bytes: vec![0; MAX_PAYLOAD as usize - 7],
            },
        );
        assert!(matches!(encode(&w), Err(WireError::PayloadTooLarge { .. })));
        let r = Frame::reply(0, Reply::Read(vec![0; MAX_PAYLOAD as usize + 1]));
        assert!(matches!(encode(&r), Err(WireError::PayloadTooLarge { .. })));
    }

    #[test]
    fn error_buffer_full_then_poisoned() {
        // Limits: 16-byte payloads, 40 buffered bytes (one 36-byte frame plus a little).
        let mut d = Decoder::with_limits(16, 40);
        let frame = req(Op::Write, &[1; 16]);
        d.push(&frame[..30]).unwrap();
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(
            d.push(&[0; 11]),
            Err(WireError::BufferFull {
                buffered: 41,
                limit: 40
            })
        );
        assert!(d.is_poisoned());
        assert_eq!(d.next_frame(), Err(WireError::Poisoned));
        assert_eq!(d.push(&[]), Err(WireError::Poisoned));
        // Limits below one frame are raised to one frame.
        let mut d = Decoder::with_limits(16, 0);
        d.push(&frame).unwrap();
        assert!(d.next_frame().unwrap().is_some());
    }

    #[test]
    fn error_truncated_and_trailing_frame() {
        let mut b = encode(&Frame::request(1, Request::Lock { lease_ms: 1 })).unwrap();
        assert_eq!(
            decode(&b[..b.len() - 1]),
            Err(WireError::Truncated {
                need: HEADER_LEN + 4,
                have: HEADER_LEN + 3
            })
        );
        b.push(0);
        assert_eq!(
            decode(&b),
            Err(WireError::TrailingBytes {
                op: "LOCK",
                where_: "frame",
                extra: 1
            })
        );
    }

    #[test]
    fn error_malformed_short_payloads() {
        for (op, payload) in [
            (Op::Read, &[0u8; 11][..]),
            (Op::Lock, &[0; 3][..]),
            (Op::Regs, &[][..]),
            (Op::Write, &[0; 7][..]),
            (Op::Hello, &[0; 8][..]),
            (Op::ReadBatch, &[1][..]),
            (Op::HelloOk, &[0; 7][..]),
            (Op::LockOk, &[0; 7][..]),
            (Op::RegsOk, &[0; REGS_LEN - 1][..]),
            (Op::ReadBatchOk, &[1, 0, 5, 0, 0, 0, 1, 2][..]),
            (Op::Error, &[1][..]),
        ] {
            let e = decode(&req(op, payload)).unwrap_err();
            assert!(matches!(e, WireError::Malformed { .. }), "{op:?}: {e}");
        }
        // HELLO whose id length points past the payload.
        let mut p = 5u64.to_le_bytes().to_vec();
        p.push(10);
        p.extend_from_slice(b"abc");
        assert!(matches!(
            decode(&req(Op::Hello, &p)),
            Err(WireError::Malformed { .. })
        ));
        // READ_BATCH whose count does not match the ranges present.
        let mut p = 2u16.to_le_bytes().to_vec();
        p.extend_from_slice(&[0; 12]);
        assert!(matches!(
            decode(&req(Op::ReadBatch, &p)),
            Err(WireError::Malformed { .. })
        ));
        // Empty monitor id.
        let mut p = 5u64.to_le_bytes().to_vec();
        p.push(0);
        assert!(matches!(
            decode(&req(Op::Hello, &p)),
            Err(WireError::Malformed { .. })
        ));
    }

    #[test]
    fn error_malformed_regs() {
        let good = encode(&Frame::reply(0, Reply::Regs(regs()))).unwrap();
        let mut b = good.clone();
        b[HEADER_LEN + 88] = 4; // cpl
        assert!(matches!(decode(&b), Err(WireError::Malformed { .. })));
        let mut b = good.clone();
        b[HEADER_LEN + 89] = 2; // presence byte
        assert!(matches!(decode(&b), Err(WireError::Malformed { .. })));
        let mut b = good;
        b[HEADER_LEN + 89] = 0; // absent, but value 0x20 present
        assert!(matches!(decode(&b), Err(WireError::Malformed { .. })));
        let bad = Frame::reply(0, Reply::Regs(Regs { cpl: 9, ..regs() }));
        assert!(matches!(encode(&bad), Err(WireError::Malformed { .. })));
    }

    #[test]
    fn error_trailing_payload_bytes() {
        for (op, len) in [
            (Op::FetchSb, 1),
            (Op::Unlock, 2),
            (Op::Read, 13),
            (Op::Lock, 5),
            (Op::Regs, 2),
            (Op::HelloOk, 25),
            (Op::WriteOk, 1),
            (Op::LockOk, 9),
            (Op::UnlockOk, 1),
            (Op::RegsOk, REGS_LEN + 1),
        ] {
            let e = decode(&req(op, &vec![0; len])).unwrap_err();
            assert!(
                matches!(
                    e,
                    WireError::TrailingBytes {
                        where_: "payload",
                        ..
                    }
                ),
                "{op:?}: {e}"
            );
        }
        let mut p = 1u64.to_le_bytes().to_vec();
        p.push(1);
        p.extend_from_slice(b"ab");
        assert!(matches!(
            decode(&req(Op::Hello, &p)),
            Err(WireError::TrailingBytes { extra: 1, .. })
        ));
        let mut p = 1u16.to_le_bytes().to_vec();
        p.extend_from_slice(&[1, 0, 0, 0, 9, 9]);
        assert!(matches!(
            decode(&req(Op::ReadBatchOk, &p)),
            Err(WireError::TrailingBytes { extra: 1, .. })
        ));
    }

    #[test]
    fn error_too_many_ranges() {
        let mut p = 257u16.to_le_bytes().to_vec();
        p.extend_from_slice(&vec![0; 257 * 12]);
        assert_eq!(
            decode(&req(Op::ReadBatch, &p)),
            Err(WireError::TooManyRanges { count: 257 })
        );
        // Count checked before the ranges are even present.
        let p = u16::MAX.to_le_bytes();
        assert_eq!(
            decode(&req(Op::ReadBatch, &p)),
            Err(WireError::TooManyRanges { count: 65535 })
        );
        assert_eq!(
            decode(&req(Op::ReadBatchOk, &p)),
            Err(WireError::TooManyRanges { count: 65535 })
        );
        let f = Frame::request(0, Request::ReadBatch(vec![Range { gpa: 0, len: 1 }; 257]));
        assert_eq!(encode(&f), Err(WireError::TooManyRanges { count: 257 }));
        let f = Frame::reply(0, Reply::ReadBatch(vec![Vec::new(); 257]));
        assert_eq!(encode(&f), Err(WireError::TooManyRanges { count: 257 }));
    }

    #[test]
    fn error_read_too_large() {
        let mut p = 0u64.to_le_bytes().to_vec();
        p.extend_from_slice(&(MAX_READ_LEN + 1).to_le_bytes());
        assert!(matches!(
            decode(&req(Op::Read, &p)),
            Err(WireError::ReadTooLarge { .. })
        ));
        // Two ranges that are each fine but whose reply would not fit in one frame.
        let ranges = vec![
            Range {
                gpa: 0,
                len: MAX_PAYLOAD / 2,
            };
            2
        ];
        let f = Frame::request(0, Request::ReadBatch(ranges.clone()));
        assert!(matches!(encode(&f), Err(WireError::ReadTooLarge { .. })));
        let mut p = 2u16.to_le_bytes().to_vec();
        for r in ranges {
            put_range(&mut p, r);
        }
        assert!(matches!(
            decode(&req(Op::ReadBatch, &p)),
            Err(WireError::ReadTooLarge { .. })
        ));
    }

    #[test]
    fn error_range_overflow() {
        let mut p = (u64::MAX - 1).to_le_bytes().to_vec();
        p.extend_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            decode(&req(Op::Read, &p)),
            Err(WireError::RangeOverflow {
                gpa: u64::MAX - 1,
                len: 2
            })
        );
        let mut p = u64::MAX.to_le_bytes().to_vec();
        p.push(1);
        assert!(matches!(
            decode(&req(Op::Write, &p)),
            Err(WireError::RangeOverflow { .. })
        ));
        let f = Frame::request(
            0,
            Request::Write {
                gpa: u64::MAX,
                bytes: vec![1],
            },
        );
        assert!(matches!(encode(&f), Err(WireError::RangeOverflow { .. })));
    }

    #[test]
    fn error_strings() {
        let f = Frame::request(
            0,
            Request::Hello {
                monitor_id: "m".repeat(MAX_MONITOR_ID + 1),
                nonce: 0,
            },
        );
        assert!(matches!(encode(&f), Err(WireError::StringTooLong { .. })));
        let mut p = 0u64.to_le_bytes().to_vec();
        p.push(65);
        p.extend_from_slice(&[b'm'; 65]);
        assert!(matches!(
            decode(&req(Op::Hello, &p)),
            Err(WireError::StringTooLong { .. })
        ));
        let mut p = 0u64.to_le_bytes().to_vec();
        p.push(2);
        p.extend_from_slice(&[0xc3, 0x28]);
        assert_eq!(
            decode(&req(Op::Hello, &p)),
            Err(WireError::InvalidUtf8 {
                field: "monitor id"
            })
        );
        let f = Frame::reply(
            0,
            Reply::Error {
                code: 1,
                message: "e".repeat(MAX_ERROR_MESSAGE + 1),
            },
        );
        assert!(matches!(encode(&f), Err(WireError::StringTooLong { .. })));
        let mut p = 1u16.to_le_bytes().to_vec();
        p.extend_from_slice(&[b'e'; MAX_ERROR_MESSAGE + 1]);
        assert!(matches!(
            decode(&req(Op::Error, &p)),
            Err(WireError::StringTooLong { .. })
        ));
        let mut p = 1u16.to_le_bytes().to_vec();
        p.push(0xff);
        assert_eq!(
            decode(&req(Op::Error, &p)),
            Err(WireError::InvalidUtf8 {
                field: "error message"
            })
        );
    }

    #[test]
    fn failed_encode_leaves_buffer_untouched() {
        let mut out = b"prefix".to_vec();
        let f = Frame::request(0, Request::ReadBatch(vec![Range { gpa: 0, len: 1 }; 300]));
        assert!(f.encode_into(&mut out).is_err());
        assert_eq!(out, b"prefix");
    }

    /// Feeds `bytes` to `decode` and to a `Decoder` in chunks; whatever decodes must re-encode to the
    /// same bytes (the format is canonical). Panics only if that property fails.
    fn exercise(bytes: &[u8], rng: &mut XorShift) {
        if let Ok(f) = decode(bytes) {
            assert_eq!(encode(&f).unwrap(), bytes);
        }
        let mut d = Decoder::with_limits(1 << 16, 1 << 17);
        let mut rest = bytes;
        let mut consumed = 0;
        while !rest.is_empty() {
            let n = 1 + rng.below(rest.len().min(64));
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            if d.push(chunk).is_err() {
                return;
            }
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => {
                        let e = encode(&f).unwrap();
                        assert_eq!(e, &bytes[consumed..consumed + e.len()]);
                        consumed += e.len();
                    }
                    Ok(None) => break,
                    Err(_) => {
                        assert!(d.is_poisoned());
                        assert_eq!(d.next_frame(), Err(WireError::Poisoned));
                        assert_eq!(d.push(b"x"), Err(WireError::Poisoned));
                        return;
                    }
                }
            }
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut rng = XorShift(0x0bad_5eed_cafe_f00d);
        let valid: Vec<Vec<u8>> = samples().iter().map(|f| encode(f).unwrap()).collect();
        for i in 0..4000 {
            let input = match i % 4 {
                // Pure noise.
                0 => {
                    let n = rng.below(300);
                    rng.bytes(n)
                }
                // Noise behind a valid magic and version, so the header checks are passed often.
                1 => {
                    let n = rng.below(200);
                    let mut b = MAGIC_BYTES.to_vec();
                    b.push(VERSION);
                    let op = [
                        0x01u8, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x81, 0x84, 0x88, 0xff,
                    ][rng.below(12)];
                    b.push(op);
                    b.extend_from_slice(&[0, 0]);
                    b.extend_from_slice(&rng.next().to_le_bytes());
                    b.extend_from_slice(&(n as u32).to_le_bytes());
                    b.extend(rng.bytes(n));
                    b
                }
                // A valid frame with a few bytes changed.
                2 => {
                    let mut b = valid[rng.below(valid.len())].clone();
                    for _ in 0..1 + rng.below(4) {
                        let at = rng.below(b.len());
                        b[at] = rng.next() as u8;
                    }
                    b
                }
                // A valid frame truncated, extended, or followed by another.
                _ => {
                    let mut b = valid[rng.below(valid.len())].clone();
                    match rng.below(3) {
                        0 => b.truncate(rng.below(b.len())),
                        1 => {
                            let n = 1 + rng.below(16);
                            b.extend(rng.bytes(n))
                        }
                        _ => b.extend_from_slice(&valid[rng.below(valid.len())]),
                    }
                    b
                }
            };
            exercise(&input, &mut rng);
        }
    }

    #[test]
    fn errors_render_actionable_messages() {
        let e = WireError::BufferFull {
            buffered: 10,
            limit: 5,
        };
        assert!(e.to_string().contains("drain frames"));
        let e = WireError::UnsupportedVersion { version: 9 };
        assert!(e.to_string().contains("speaks 1"));
    }
}
