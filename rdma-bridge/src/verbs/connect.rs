//! The connect blob (version 1): what the target and a monitor exchange, as the opaque payload of
//! the control channel's `RDMA_CONNECT` frame, to connect a queue pair. It comes from the peer and
//! is untrusted. Built with or without the `verbs` feature.
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

use introspect::le;

use super::VerbsError;

/// The four magic bytes at the start of a connect blob.
pub const CONNECT_MAGIC: [u8; 4] = *b"BDRV";
/// The connect blob version this module writes and accepts.
pub const CONNECT_VERSION: u8 = 1;
/// Largest connect blob accepted (it travels in one control-channel frame).
pub const MAX_CONNECT_LEN: usize = 4096;
/// Most regions in one connect blob, and most regions one [`VerbsTarget`](super::VerbsTarget)
/// registers.
pub const MAX_REGIONS: usize = 64;
/// Longest region name, in bytes.
pub const MAX_NAME_LEN: usize = 32;
/// Size of the fixed part of a connect blob.
pub const CONNECT_HEADER_LEN: usize = 36;
/// Size of the fixed part of one region record.
pub const REGION_RECORD_LEN: usize = 30;

/// Connect-blob flag: the endpoint carries a GID.
const FLAG_GID: u8 = 0x01;
/// Queue pair and packet sequence numbers are 24-bit.
pub(super) const QPN_LIMIT: u32 = 1 << 24;

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

pub(super) fn validate_name(name: &[u8]) -> Result<(), VerbsError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.iter().all(u8::is_ascii_graphic) {
        return Err(VerbsError::BadName {
            name: String::from_utf8_lossy(&name[..name.len().min(64)]).into_owned(),
        });
    }
    Ok(())
}

pub(super) fn check_end(
    name: &str,
    what: &'static str,
    start: u64,
    len: u64,
) -> Result<u64, VerbsError> {
    start
        .checked_add(len)
        .ok_or_else(|| VerbsError::RegionOverflow {
            name: name.to_owned(),
            what,
            start,
            len,
        })
}

pub(super) fn validate_regions(regions: &[RegionInfo]) -> Result<(), VerbsError> {
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
    out.push(
        u8::try_from(regions.len()).map_err(|_| VerbsError::TooManyRegions {
            count: regions.len(),
        })?,
    );
    out.extend_from_slice(&endpoint.qp_num.to_le_bytes());
    out.extend_from_slice(&endpoint.psn.to_le_bytes());
    out.extend_from_slice(&endpoint.lid.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&endpoint.gid.unwrap_or([0; 16]));
    for r in regions {
        out.push(r.access.to_byte());
        out.push(u8::try_from(r.name.len()).map_err(|_| VerbsError::BadName {
            name: r.name.clone(),
        })?);
        out.extend_from_slice(&r.rkey.to_le_bytes());
        out.extend_from_slice(&r.gpa.to_le_bytes());
        out.extend_from_slice(&r.len.to_le_bytes());
        out.extend_from_slice(&r.remote_addr.to_le_bytes());
        out.extend_from_slice(r.name.as_bytes());
    }
    debug_assert!(out.len() <= MAX_CONNECT_LEN);
    Ok(out)
}

/// The blob's fields in order ([`introspect::le::Cursor`]); running out is
/// [`VerbsError::ConnectTruncated`].
struct Reader<'a> {
    c: le::Cursor<'a>,
    len: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader {
            c: le::Cursor::new(bytes),
            len: bytes.len(),
        }
    }

    fn short(&self, s: le::Short) -> VerbsError {
        VerbsError::ConnectTruncated {
            what: s.field,
            offset: s.at,
            end: s.at.saturating_add(s.need),
            len: self.len,
        }
    }

    fn pos(&self) -> usize {
        self.c.pos()
    }

    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], VerbsError> {
        self.c.bytes(n, what).map_err(|e| self.short(e))
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], VerbsError> {
        self.c.array(what).map_err(|e| self.short(e))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, VerbsError> {
        self.c.u8(what).map_err(|e| self.short(e))
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, VerbsError> {
        self.c.u16(what).map_err(|e| self.short(e))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, VerbsError> {
        self.c.u32(what).map_err(|e| self.short(e))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, VerbsError> {
        self.c.u64(what).map_err(|e| self.short(e))
    }
}

/// Decodes a connect blob (format in the module docs), validating every field.
pub fn decode_connect(bytes: &[u8]) -> Result<(Endpoint, Vec<RegionInfo>), VerbsError> {
    if bytes.len() > MAX_CONNECT_LEN {
        return Err(VerbsError::ConnectTooLong { len: bytes.len() });
    }
    let mut r = Reader::new(bytes);
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
            let avail = bytes.len().saturating_sub(r.pos()).min(name_len);
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
    if r.pos() != bytes.len() {
        return Err(VerbsError::TrailingBytes {
            count: bytes.len() - r.pos(),
        });
    }
    Ok((endpoint, regions))
}

#[cfg(test)]
mod tests;
