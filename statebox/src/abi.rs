//! The State Box ABI v1 (see `ABI.md`): constants, the check, and the parsers and encoders of the
//! region header, slots and copies.
//!
//! Pure code: no `unsafe`, no OS calls. A monitor parses guest memory with it, so everything it
//! reads is hostile input: it never panics, and it never allocates more than one box's data
//! (at most [`MAX_CAPACITY`] bytes) per parsed slot.

/// The fixed user virtual address of a process's State Box region.
pub const STATEBOX_VA: u64 = 0x3bd0_0000_0000;
/// The region's magic number, at offset 0 of the header.
pub const MAGIC: u64 = u64::from_le_bytes(*b"BDSTBOX1");
/// The ABI version this module reads and writes.
pub const VERSION: u32 = 1;
/// Bytes before the first slot (the header page).
pub const HEADER_BYTES: u32 = 4096;
/// Bytes of a slot before its two copies (seq and reserved words).
pub const SLOT_HEADER: u32 = 64;
/// Bytes of a copy before its data (id, generation, len, reserved, check).
pub const COPY_HEADER: u32 = 32;
/// The most slots a region may have.
pub const MAX_SLOTS: u32 = 4096;
/// The largest capacity (data bytes of one box).
pub const MAX_CAPACITY: u32 = 1 << 20;
/// The largest region, header included.
pub const MAX_REGION_BYTES: u64 = 8 << 20;
/// Bytes of the header that carry fields (the rest of the header page is zero).
pub const HEADER_USED: usize = 64;

/// Offset of `next_generation` in the header (the one header field that changes).
pub const HDR_NEXT_GENERATION: usize = 0x28;

const PAGE: u64 = 4096;
const COPY_ALIGN: u32 = 64;

const HDR_MAGIC: usize = 0x00;
const HDR_VERSION: usize = 0x08;
const HDR_HEADER_BYTES: usize = 0x0c;
const HDR_SLOT_COUNT: usize = 0x10;
const HDR_SLOT_SIZE: usize = 0x14;
const HDR_CAPACITY: usize = 0x18;
const HDR_REGION_GENERATION: usize = 0x20;

const COPY_ID: usize = 0x00;
const COPY_GENERATION: usize = 0x08;
const COPY_LEN: usize = 0x10;
const COPY_CHECK: usize = 0x18;

/// Errors of parsing or encoding State Box memory. Every one names what is wrong with the bytes;
/// a monitor refuses the slot (or, for header errors, the region) and reports it.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AbiError {
    /// Fewer bytes than the structure needs.
    #[error(
        "State Box memory too short: {need} bytes needed, {have} given; read the whole structure"
    )]
    Short {
        /// Bytes needed.
        need: u64,
        /// Bytes given.
        have: u64,
    },
    /// The header does not start with [`MAGIC`].
    #[error("no State Box region here: magic {found:#018x} is not BDSTBOX1")]
    BadMagic {
        /// The magic found.
        found: u64,
    },
    /// The header's version is not [`VERSION`].
    #[error(
        "State Box ABI version {found} is not supported (this reader knows version {VERSION})"
    )]
    BadVersion {
        /// The version found.
        found: u32,
    },
    /// The header's sizes are out of bounds or inconsistent.
    #[error("State Box region geometry is invalid: {0}")]
    BadGeometry(String),
    /// The header's region generation is 0 (a writer must set a random nonzero value).
    #[error(
        "State Box region has region_generation 0: the writer must set a random nonzero value"
    )]
    NoRegionGeneration,
    /// A slot index past the region's slot count.
    #[error("State Box slot {slot} does not exist: the region has {slot_count} slots")]
    NoSuchSlot {
        /// The slot asked for.
        slot: u32,
        /// The region's slot count.
        slot_count: u32,
    },
    /// A slot's seq is odd (publishing always adds 2 to an even seq).
    #[error("State Box slot {slot}: seq {seq} is odd; the slot is corrupt")]
    OddSeq {
        /// The slot.
        slot: u32,
        /// The seq found.
        seq: u64,
    },
    /// A copy's len is larger than the region's capacity.
    #[error(
        "State Box slot {slot}: len {len} exceeds the capacity {capacity}; the slot is corrupt"
    )]
    LenTooLarge {
        /// The slot.
        slot: u32,
        /// The len found.
        len: u32,
        /// The region's capacity.
        capacity: u32,
    },
    /// A box (id != 0) with generation 0.
    #[error("State Box slot {slot}: box {id:#x} has generation 0; the slot is corrupt")]
    NoGeneration {
        /// The slot.
        slot: u32,
        /// The box's id.
        id: u64,
    },
    /// The copy's check does not match its contents (torn or corrupt).
    #[error("State Box slot {slot}: the check of box {id:#x} does not match its data (torn or corrupt copy)")]
    BadCheck {
        /// The slot.
        slot: u32,
        /// The box's id.
        id: u64,
    },
    /// Data to encode is larger than the capacity.
    #[error("State Box data of {len} bytes does not fit the capacity of {capacity} bytes: export less or create the region with a larger capacity")]
    DataTooLarge {
        /// The data's length.
        len: usize,
        /// The region's capacity.
        capacity: u32,
    },
}

/// The State Box check of a copy: detects torn and corrupt copies (not forgery).
pub fn check(id: u64, generation: u64, data: &[u8]) -> u64 {
    // len is at most MAX_CAPACITY for valid copies; for longer data the low 64 bits are hashed,
    // which is what the C library does with size_t as well.
    let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
    let mut h = 0x9E37_79B9_7F4A_7C15 ^ id ^ generation.rotate_left(32) ^ len;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = mix(h, u64::from_le_bytes(b));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        h = mix(h, u64::from_le_bytes(b));
    }
    h ^= h >> 31;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 29;
    h
}

#[inline(always)]
fn mix(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(0x0100_0000_01B3).rotate_left(29)
}

/// The ACTIVE copy (0 or 1) of a slot whose seq is `seq`.
pub fn active_copy(seq: u64) -> u32 {
    u32::from((seq >> 1) & 1 == 1)
}

/// The region header's fields (magic, version and header_bytes are implied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Number of slots (1..=[`MAX_SLOTS`]).
    pub slot_count: u32,
    /// Bytes of a slot: `SLOT_HEADER + 2 * copy_size`.
    pub slot_size: u32,
    /// Max data bytes of one box (multiple of 8, 8..=[`MAX_CAPACITY`]).
    pub capacity: u32,
    /// Nonzero random value told apart from any other region of the same process.
    pub region_generation: u64,
    /// The generation the writer gives the next created box (informational).
    pub next_generation: u64,
}

fn copy_size_of(capacity: u32) -> Option<u32> {
    let raw = capacity.checked_add(COPY_HEADER)?;
    let rounded = raw.checked_add(COPY_ALIGN - 1)?;
    Some(rounded / COPY_ALIGN * COPY_ALIGN)
}

fn slot_size_of(capacity: u32) -> Option<u32> {
    copy_size_of(capacity)?
        .checked_mul(2)?
        .checked_add(SLOT_HEADER)
}

fn geometry(what: String) -> AbiError {
    AbiError::BadGeometry(what)
}

impl Header {
    /// The header of a new region of `slot_count` slots of `capacity` data bytes each;
    /// `region_generation` and `next_generation` are 0 (the writer sets them).
    pub fn new(slot_count: u32, capacity: u32) -> Result<Header, AbiError> {
        let slot_size = slot_size_of(capacity)
            .ok_or_else(|| geometry(format!("capacity {capacity} is far too large")))?;
        let h = Header {
            slot_count,
            slot_size,
            capacity,
            region_generation: 0,
            next_generation: 0,
        };
        h.validate()?;
        Ok(h)
    }

    /// Checks that the sizes are within bounds and consistent (not `region_generation`).
    pub fn validate(&self) -> Result<(), AbiError> {
        if self.slot_count == 0 || self.slot_count > MAX_SLOTS {
            return Err(geometry(format!(
                "slot_count {} is not in 1..={MAX_SLOTS}",
                self.slot_count
            )));
        }
        if self.capacity < 8 || self.capacity > MAX_CAPACITY || self.capacity % 8 != 0 {
            return Err(geometry(format!(
                "capacity {} is not a multiple of 8 in 8..={MAX_CAPACITY}",
                self.capacity
            )));
        }
        let want = slot_size_of(self.capacity)
            .ok_or_else(|| geometry(format!("capacity {} is far too large", self.capacity)))?;
        if self.slot_size != want {
            return Err(geometry(format!(
                "slot_size {} does not match capacity {} (expected {want})",
                self.slot_size, self.capacity
            )));
        }
        let bytes = self.region_bytes();
        if bytes > MAX_REGION_BYTES {
            return Err(geometry(format!(
                "region of {} slots of {} bytes needs {bytes} bytes, more than {MAX_REGION_BYTES}: use fewer slots or a smaller capacity",
                self.slot_count, self.slot_size
            )));
        }
        Ok(())
    }

    /// Parses and validates a header from the first [`HEADER_USED`] bytes of a region.
    /// Reserved fields are ignored.
    pub fn parse(bytes: &[u8]) -> Result<Header, AbiError> {
        let b = bytes.get(..HEADER_USED).ok_or(AbiError::Short {
            need: HEADER_USED as u64,
            have: bytes.len() as u64,
        })?;
        let magic = le_u64(b, HDR_MAGIC);
        if magic != MAGIC {
            return Err(AbiError::BadMagic { found: magic });
        }
        let version = le_u32(b, HDR_VERSION);
        if version != VERSION {
            return Err(AbiError::BadVersion { found: version });
        }
        let header_bytes = le_u32(b, HDR_HEADER_BYTES);
        if header_bytes != HEADER_BYTES {
            return Err(geometry(format!(
                "header_bytes {header_bytes} is not {HEADER_BYTES}"
            )));
        }
        let h = Header {
            slot_count: le_u32(b, HDR_SLOT_COUNT),
            slot_size: le_u32(b, HDR_SLOT_SIZE),
            capacity: le_u32(b, HDR_CAPACITY),
            region_generation: le_u64(b, HDR_REGION_GENERATION),
            next_generation: le_u64(b, HDR_NEXT_GENERATION),
        };
        h.validate()?;
        if h.region_generation == 0 {
            return Err(AbiError::NoRegionGeneration);
        }
        Ok(h)
    }

    /// The header's [`HEADER_USED`] bytes (the rest of the header page is zero).
    pub fn encode(&self) -> [u8; HEADER_USED] {
        let mut b = [0u8; HEADER_USED];
        put_u64(&mut b, HDR_MAGIC, MAGIC);
        put_u32(&mut b, HDR_VERSION, VERSION);
        put_u32(&mut b, HDR_HEADER_BYTES, HEADER_BYTES);
        put_u32(&mut b, HDR_SLOT_COUNT, self.slot_count);
        put_u32(&mut b, HDR_SLOT_SIZE, self.slot_size);
        put_u32(&mut b, HDR_CAPACITY, self.capacity);
        put_u64(&mut b, HDR_REGION_GENERATION, self.region_generation);
        put_u64(&mut b, HDR_NEXT_GENERATION, self.next_generation);
        b
    }

    /// Bytes of one copy: `COPY_HEADER + capacity` rounded up to 64.
    pub fn copy_size(&self) -> u32 {
        // Saturates for an absurd capacity; validate() refuses such headers.
        copy_size_of(self.capacity).unwrap_or(u32::MAX)
    }

    /// Bytes of the region: `HEADER_BYTES + slot_count * slot_size` rounded up to 4096.
    pub fn region_bytes(&self) -> u64 {
        let raw = u64::from(HEADER_BYTES) + u64::from(self.slot_count) * u64::from(self.slot_size);
        raw.div_ceil(PAGE) * PAGE
    }

    /// Bytes a reader needs to see every slot: `HEADER_BYTES + slot_count * slot_size`.
    pub fn used_bytes(&self) -> u64 {
        u64::from(HEADER_BYTES) + u64::from(self.slot_count) * u64::from(self.slot_size)
    }

    /// Offset of slot `slot` from the region's start, or None past the last slot.
    pub fn slot_offset(&self, slot: u32) -> Option<u64> {
        if slot >= self.slot_count {
            return None;
        }
        Some(u64::from(HEADER_BYTES) + u64::from(slot) * u64::from(self.slot_size))
    }

    /// Offset of copy `copy` (0 or 1) from its slot's start.
    pub fn copy_offset(&self, copy: u32) -> u64 {
        u64::from(SLOT_HEADER) + u64::from(copy & 1) * u64::from(self.copy_size())
    }

    /// The `slot_size` bytes of slot `slot` within the bytes of a whole region, if present.
    pub fn slot_bytes<'a>(&self, region: &'a [u8], slot: u32) -> Option<&'a [u8]> {
        let start = usize::try_from(self.slot_offset(slot)?).ok()?;
        let end = start.checked_add(usize::try_from(self.slot_size).ok()?)?;
        region.get(start..end)
    }
}

/// A box read from a slot (its active copy), with its data copied out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoxCopy {
    /// The slot it was read from.
    pub slot: u32,
    /// The slot's seq when read.
    pub seq: u64,
    /// The box's id (the application's session id; never 0 here).
    pub id: u64,
    /// The box's generation (never 0 here).
    pub generation: u64,
    /// The box's data (`len` bytes).
    pub data: Vec<u8>,
}

/// A box read from a slot (its active copy), borrowing its data from the slot's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoxRef<'a> {
    /// The slot it was read from.
    pub slot: u32,
    /// The slot's seq when read.
    pub seq: u64,
    /// The box's id (never 0 here).
    pub id: u64,
    /// The box's generation (never 0 here).
    pub generation: u64,
    /// The box's data (`len` bytes).
    pub data: &'a [u8],
}

impl BoxRef<'_> {
    /// The box with its data copied out.
    pub fn to_owned_copy(&self) -> BoxCopy {
        BoxCopy {
            slot: self.slot,
            seq: self.seq,
            id: self.id,
            generation: self.generation,
            data: self.data.to_vec(),
        }
    }
}

/// The seq of a slot (its first 8 bytes), or None if `bytes` is shorter.
pub fn slot_seq(bytes: &[u8]) -> Option<u64> {
    let b: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

/// Parses slot `slot` from its `slot_size` bytes: Ok(None) for a free slot (active copy id 0).
pub fn parse_slot(h: &Header, slot: u32, bytes: &[u8]) -> Result<Option<BoxCopy>, AbiError> {
    Ok(parse_slot_ref(h, slot, bytes)?.map(|b| b.to_owned_copy()))
}

/// Like [`parse_slot`], without copying the data out.
pub fn parse_slot_ref<'a>(
    h: &Header,
    slot: u32,
    bytes: &'a [u8],
) -> Result<Option<BoxRef<'a>>, AbiError> {
    h.validate()?;
    if slot >= h.slot_count {
        return Err(AbiError::NoSuchSlot {
            slot,
            slot_count: h.slot_count,
        });
    }
    let slot_size = to_usize(h.slot_size);
    let bytes = bytes.get(..slot_size).ok_or(AbiError::Short {
        need: u64::from(h.slot_size),
        have: bytes.len() as u64,
    })?;
    let seq = le_u64(bytes, 0);
    if seq % 2 != 0 {
        return Err(AbiError::OddSeq { slot, seq });
    }
    let start = to_usize(h.copy_offset(active_copy(seq)));
    let copy = bytes.get(start..).unwrap_or(&[]);
    let Some(b) = parse_copy(h.capacity, copy).map_err(|e| e.in_slot(slot))? else {
        return Ok(None);
    };
    Ok(Some(BoxRef {
        slot,
        seq,
        id: b.id,
        generation: b.generation,
        data: b.data,
    }))
}

/// The fields of a copy in use.
struct CopyRef<'a> {
    id: u64,
    generation: u64,
    data: &'a [u8],
}

/// Parses one copy (`bytes` starts at the copy). Slot numbers in errors are 0; callers set them.
fn parse_copy(capacity: u32, bytes: &[u8]) -> Result<Option<CopyRef<'_>>, AbiError> {
    let head = bytes.get(..to_usize(COPY_HEADER)).ok_or(AbiError::Short {
        need: u64::from(COPY_HEADER),
        have: bytes.len() as u64,
    })?;
    let id = le_u64(head, COPY_ID);
    if id == 0 {
        return Ok(None);
    }
    let generation = le_u64(head, COPY_GENERATION);
    if generation == 0 {
        return Err(AbiError::NoGeneration { slot: 0, id });
    }
    let len = le_u32(head, COPY_LEN);
    if len > capacity {
        return Err(AbiError::LenTooLarge {
            slot: 0,
            len,
            capacity,
        });
    }
    let start = to_usize(COPY_HEADER);
    let data = bytes
        .get(start..start + to_usize(len))
        .ok_or(AbiError::Short {
            need: u64::from(COPY_HEADER) + u64::from(len),
            have: bytes.len() as u64,
        })?;
    if le_u64(head, COPY_CHECK) != check(id, generation, data) {
        return Err(AbiError::BadCheck { slot: 0, id });
    }
    Ok(Some(CopyRef {
        id,
        generation,
        data,
    }))
}

impl AbiError {
    /// The same error naming slot `slot`.
    fn in_slot(self, slot: u32) -> AbiError {
        match self {
            AbiError::NoGeneration { id, .. } => AbiError::NoGeneration { slot, id },
            AbiError::LenTooLarge { len, capacity, .. } => AbiError::LenTooLarge {
                slot,
                len,
                capacity,
            },
            AbiError::BadCheck { id, .. } => AbiError::BadCheck { slot, id },
            other => other,
        }
    }
}

/// Writes a complete copy {id, generation, len, check, data} into `dst` (which starts at the
/// copy and must hold `COPY_HEADER + data.len()` bytes). Bytes past the data are left as they are.
pub fn write_copy(
    dst: &mut [u8],
    capacity: u32,
    id: u64,
    generation: u64,
    data: &[u8],
) -> Result<(), AbiError> {
    let len = u32::try_from(data.len())
        .ok()
        .filter(|&l| l <= capacity)
        .ok_or(AbiError::DataTooLarge {
            len: data.len(),
            capacity,
        })?;
    let need = to_usize(COPY_HEADER) + data.len();
    let have = dst.len();
    let dst = dst.get_mut(..need).ok_or(AbiError::Short {
        need: need as u64,
        have: have as u64,
    })?;
    let (head, body) = dst.split_at_mut(to_usize(COPY_HEADER));
    put_u64(head, COPY_ID, id);
    put_u64(head, COPY_GENERATION, generation);
    put_u32(head, COPY_LEN, len);
    put_u32(head, COPY_LEN + 4, 0);
    put_u64(head, COPY_CHECK, check(id, generation, data));
    body.copy_from_slice(data);
    Ok(())
}

/// A copy's `copy_size` bytes (for tests and tools; the writer uses [`write_copy`] in place).
pub fn encode_copy(h: &Header, id: u64, generation: u64, data: &[u8]) -> Result<Vec<u8>, AbiError> {
    h.validate()?;
    let mut v = vec![0u8; to_usize(h.copy_size())];
    write_copy(&mut v, h.capacity, id, generation, data)?;
    Ok(v)
}

/// A whole region as a monitor sees it: its header, the boxes in use, and the refused slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The region's header.
    pub header: Header,
    /// The boxes in use, by slot.
    pub boxes: Vec<BoxCopy>,
    /// Slots refused, with why.
    pub bad: Vec<(u32, AbiError)>,
}

/// Parses a whole region (`bytes` from its start, at least [`Header::used_bytes`] long). A bad
/// header refuses the region; a bad slot is reported in [`Snapshot::bad`] and the rest still read.
pub fn parse_region(bytes: &[u8]) -> Result<Snapshot, AbiError> {
    let header = Header::parse(bytes)?;
    let need = header.used_bytes();
    if (bytes.len() as u64) < need {
        return Err(AbiError::Short {
            need,
            have: bytes.len() as u64,
        });
    }
    let mut boxes = Vec::new();
    let mut bad = Vec::new();
    for slot in 0..header.slot_count {
        let Some(sb) = header.slot_bytes(bytes, slot) else {
            bad.push((
                slot,
                AbiError::Short {
                    need,
                    have: bytes.len() as u64,
                },
            ));
            continue;
        };
        match parse_slot(&header, slot, sb) {
            Ok(Some(b)) => boxes.push(b),
            Ok(None) => {}
            Err(e) => bad.push((slot, e)),
        }
    }
    Ok(Snapshot { header, boxes, bad })
}

fn to_usize(v: impl Into<u64>) -> usize {
    // Every value passed here is a u32; usize is at least 32 bits on every target we build.
    usize::try_from(v.into()).unwrap_or(usize::MAX)
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    if let Some(s) = b.get_mut(off..off + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    if let Some(s) = b.get_mut(off..off + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
#[path = "abi_tests.rs"]
mod tests;
