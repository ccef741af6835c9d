//! Frames: the header, whole-frame `encode`/`decode`, and the streaming [`Decoder`].

use super::payload::{decode_payload, Cursor};
use super::*;

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
pub(super) fn check_magic_prefix(bytes: &[u8]) -> Result<(), WireError> {
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
        self.next_raw(|request_id, op, payload| {
            Ok(Frame {
                request_id,
                message: decode_payload(op, payload)?,
            })
        })
    }

    /// The next complete frame as `(request id, op, payload)` handed to `read`, without copying
    /// the payload out; the frame is consumed after `read` returns. `Ok(None)` if more bytes are
    /// needed. Any error (of the frame or of `read`) poisons the decoder.
    pub fn next_raw<T>(
        &mut self,
        read: impl FnOnce(u64, u8, &[u8]) -> Result<T, WireError>,
    ) -> Result<Option<T>, WireError> {
        if self.poisoned {
            return Err(WireError::Poisoned);
        }
        let r = self.try_next_raw(read);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn try_next_raw<T>(
        &mut self,
        read: impl FnOnce(u64, u8, &[u8]) -> Result<T, WireError>,
    ) -> Result<Option<T>, WireError> {
        let Some(h) = self.buf.first_chunk::<HEADER_LEN>() else {
            check_magic_prefix(&self.buf)?;
            return Ok(None);
        };
        let header = Header::parse(h, self.max_payload)?;
        let total = header.frame_len();
        let Some(payload) = self.buf.get(HEADER_LEN..total) else {
            return Ok(None);
        };
        let out = read(header.request_id, header.op, payload)?;
        self.buf.drain(..total);
        Ok(Some(out))
    }
}
