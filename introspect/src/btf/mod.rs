//! A reader for the kernel's BTF (BPF Type Format): struct layouts, type sizes and enum values,
//! straight from the guest kernel's own type information, so that no offset is ever written by
//! hand.
//!
//! The format is described in the kernel's `Documentation/bpf/btf.rst`: a 24-byte header, a type
//! section (a sequence of `btf_type` records, each followed by kind-specific data, numbered from
//! 1; id 0 is `void`) and a string section of NUL-terminated names.
//!
//! The blob is untrusted input (it comes from a kernel image that a guest may have been built
//! from by anyone). [`Btf::parse`] is a total function over arbitrary bytes: it checks every
//! section bound, every record length, every string offset and every type id once, and all later
//! look-ups still go through checked accessors. Type chains are followed for at most
//! [`MAX_RESOLVE_STEPS`] steps, anonymous members are flattened to a bounded depth with a bounded
//! budget, and sizes are computed with checked arithmetic. Nothing allocates in proportion to a
//! count read from the blob without that count having been bounded by the blob's length first.

use std::fmt;

use crate::conv::usize_from;
use crate::elf::{self, ElfError};
use crate::le;

/// A BTF type id (index into the type section; 0 is `void`).
pub type TypeId = u32;

/// Longest chain of typedef/const/volatile/restrict/type-tag/array/var links followed.
pub const MAX_RESOLVE_STEPS: u32 = 64;
/// Pointer size of the guests we read (x86-64).
pub const POINTER_SIZE: u64 = 8;
/// The BTF magic number.
pub const MAGIC: u16 = 0xeb9f;
/// The BTF version we read.
pub const VERSION: u8 = 1;
/// Most types a blob may hold (the kernel's `BTF_MAX_TYPE`).
pub const MAX_TYPES: usize = 0x000f_ffff;
/// Deepest nesting of anonymous struct/union members that is flattened.
pub const MAX_ANON_DEPTH: u32 = 32;
/// Most members (including anonymous containers) visited while flattening one struct.
pub const MAX_FLAT_MEMBERS: u32 = 1 << 16;

const HEADER_LEN: usize = 24;

/// A position, count or type id inside a blob whose sections are at most 4 GiB (their lengths are
/// u32 header fields) and whose ids are at most [`MAX_TYPES`], so it always fits a u32; saturates
/// rather than wraps should that ever stop being true.
fn u32_sat(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
const TYPE_HEADER_LEN: usize = 12;

/// Why BTF could not be read or a question about it could not be answered.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    /// The kernel image could not be read.
    #[error("reading the kernel image: {0}")]
    Elf(#[from] ElfError),
    /// The kernel image has no `.BTF` section.
    #[error("the kernel image has no .BTF section; the kernel must be built with CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf,
    /// The blob ends before something it announces.
    #[error("BTF truncated: {what} needs {need} bytes, the blob has {have}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// Wrong magic number.
    #[error("not BTF: magic {0:#06x}, expected {MAGIC:#06x}")]
    BadMagic(u16),
    /// BTF of a big-endian target.
    #[error("this BTF is big-endian; only little-endian (x86-64) kernels are supported")]
    BigEndian,
    /// Unknown version.
    #[error("BTF version {0} is not supported (this reader knows version {VERSION})")]
    Version(u8),
    /// A header field with an impossible value.
    #[error("malformed BTF header: {0}")]
    BadHeader(String),
    /// A broken string section.
    #[error("malformed BTF string section: {0}")]
    BadStrings(String),
    /// A type record that runs past the type section.
    #[error("BTF type [{id}] ({kind}) at type-section offset {offset:#x} needs {need} bytes, only {have} remain")]
    TruncatedType {
        /// Its id.
        id: TypeId,
        /// Its kind.
        kind: Kind,
        /// Offset of its record.
        offset: u32,
        /// Bytes the record needs.
        need: u64,
        /// Bytes left in the section.
        have: u64,
    },
    /// A kind this reader does not know.
    #[error("BTF type [{id}] has unknown kind {kind}")]
    UnknownKind {
        /// Its id.
        id: TypeId,
        /// The raw kind.
        kind: u32,
    },
    /// More types than the format allows.
    #[error("BTF holds more than {MAX_TYPES} types")]
    TooManyTypes,
    /// A string offset outside the string section.
    #[error("BTF type [{id}] refers to string offset {offset:#x}, outside the {len}-byte string section")]
    StringOutOfRange {
        /// The referring type.
        id: TypeId,
        /// The offset.
        offset: u32,
        /// Length of the string section.
        len: usize,
    },
    /// A string that is not UTF-8.
    #[error("BTF string at offset {0:#x} is not valid UTF-8")]
    NotUtf8(u32),
    /// A type id that does not exist.
    #[error("BTF type [{id}] refers to type [{target}], but there are only {count} types")]
    TypeOutOfRange {
        /// The referring type (0 when the id came from the caller).
        id: TypeId,
        /// The missing id.
        target: TypeId,
        /// Number of types (including void).
        count: usize,
    },
    /// A type id (from the caller) that does not exist.
    #[error("BTF has no type [{id}] (it has {count} types)")]
    UnknownType {
        /// The id.
        id: TypeId,
        /// Number of types (including void).
        count: usize,
    },
    /// Internal bounds check (cannot happen on a blob that passed parse()).
    #[error("BTF type data offset {0:#x} is out of range")]
    Corrupt(u32),
    /// A chain of type links that does not end.
    #[error("BTF type [{0}]: chain of typedef/qualifier/array links is longer than {MAX_RESOLVE_STEPS} steps (a cycle?)")]
    ResolveLoop(TypeId),
    /// A type without a size (void, function, forward declaration).
    #[error("BTF type [{id}] ({kind}) has no size")]
    NoSize {
        /// The type.
        id: TypeId,
        /// Its kind.
        kind: Kind,
    },
    /// A size that overflows 64 bits.
    #[error("BTF type [{0}]: size overflows 64 bits")]
    Overflow(TypeId),
    /// A type of the wrong kind for the question.
    #[error("BTF type [{id}] is a {found}, expected {expected}")]
    WrongKind {
        /// The type.
        id: TypeId,
        /// What was asked for.
        expected: &'static str,
        /// What it is.
        found: Kind,
    },
    /// No type of that name.
    #[error("the kernel's BTF has no {what} named {name:?}")]
    NotFound {
        /// Kind of thing looked for.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// Only a forward declaration exists.
    #[error("the kernel's BTF only has a forward declaration of {0:?}, not its definition")]
    Incomplete(String),
    /// The struct has no such member.
    #[error("struct {structure} has no member {member:?} in this kernel")]
    NoMember {
        /// The struct.
        structure: String,
        /// The member asked for.
        member: String,
    },
    /// The member is a bitfield (no byte offset).
    #[error("{structure}.{member} is a bitfield ({bits} bits at bit {offset_bits}); it has no byte offset")]
    Bitfield {
        /// The struct.
        structure: String,
        /// The member.
        member: String,
        /// Bit offset.
        offset_bits: u64,
        /// Width.
        bits: u32,
    },
    /// A member that lies outside its struct.
    #[error("{structure}.{member} (bits {offset_bits}..+{size_bits}) lies outside the {size}-byte struct")]
    MemberOutside {
        /// The struct.
        structure: String,
        /// The member.
        member: String,
        /// Its bit offset.
        offset_bits: u64,
        /// Its size in bits.
        size_bits: u64,
        /// The struct's size.
        size: u64,
    },
    /// A path step through something that is not an embedded struct or union.
    #[error(
        "{structure}.{member} is not an embedded struct or union (pointers must be read first)"
    )]
    NotEmbedded {
        /// The struct.
        structure: String,
        /// The member.
        member: String,
    },
    /// Too many members, or anonymous members nested too deep.
    #[error("struct {0}: too many members or anonymous members nested too deep")]
    TooManyMembers(String),
    /// An error about one member.
    #[error("in {structure}.{member}: {source}")]
    InMember {
        /// The struct.
        structure: String,
        /// The member.
        member: String,
        /// What went wrong.
        source: Box<BtfError>,
    },
    /// No such enumerator.
    #[error("enum {enum_name} has no enumerator {constant:?} in this kernel")]
    NoEnumerator {
        /// The enum ("" when any enum was searched).
        enum_name: String,
        /// The constant.
        constant: String,
    },
    /// An enumerator defined with different values in different enums.
    #[error("enumerator {0:?} is defined with different values in several enums")]
    Ambiguous(String),
}

/// One decoded `btf_type` header; `extra` is the offset of its kind-specific data in the type
/// section (the header itself is the 12 bytes before it).
#[derive(Clone, Copy, Debug)]
struct RawType {
    name_off: u32,
    size_or_type: u32,
    extra: u32,
    vlen: u16,
    kind: Kind,
    kflag: bool,
}

const VOID: RawType = RawType {
    name_off: 0,
    size_or_type: 0,
    extra: 0,
    vlen: 0,
    kind: Kind::Void,
    kflag: false,
};

/// A place in the type section that holds a reference.
#[derive(Clone, Copy, Debug)]
enum Slot {
    /// A string offset, at this type-section offset.
    Name(u32),
    /// A type id, at this type-section offset.
    Type(u32),
}

/// Parsed BTF: types, strings and a name index. Owns its data (a clone copies it: a monitor keeps
/// one parsed copy per kernel file and gives each located boot its own).
#[derive(Clone)]
pub struct Btf {
    /// Decoded type headers; index = type id, `[0]` is void.
    types: Vec<RawType>,
    /// The type section.
    data: Vec<u8>,
    /// The string section (starts and ends with NUL).
    strings: Vec<u8>,
    /// (name start, name end, id) of every named type, sorted by name then id.
    index: Vec<(u32, u32, TypeId)>,
}

impl fmt::Debug for Btf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.types.len())
            .field("type_bytes", &self.data.len())
            .field("string_bytes", &self.strings.len())
            .finish()
    }
}

impl Btf {
    /// Reads the `.BTF` section of an uncompressed kernel image (`vmlinux`).
    pub fn from_elf(vmlinux: &[u8]) -> Result<Btf, BtfError> {
        match elf::section(vmlinux, ".BTF") {
            Ok(blob) => Btf::parse(blob),
            Err(ElfError::NoSection(_)) => Err(BtfError::NoBtf),
            Err(e) => Err(e.into()),
        }
    }

    /// Parses a raw BTF blob (as in `/sys/kernel/btf/vmlinux` or a `.BTF` section).
    pub fn parse(blob: &[u8]) -> Result<Btf, BtfError> {
        let have = blob.len() as u64;
        let hdr = blob.get(..HEADER_LEN).ok_or(BtfError::Truncated {
            what: "the header",
            need: HEADER_LEN as u64,
            have,
        })?;
        let magic = le::u16_at(hdr, 0).unwrap_or(0);
        if magic == MAGIC.swap_bytes() {
            return Err(BtfError::BigEndian);
        }
        if magic != MAGIC {
            return Err(BtfError::BadMagic(magic));
        }
        if hdr[2] != VERSION {
            return Err(BtfError::Version(hdr[2]));
        }
        let field = |off| u64::from(le::u32_at(hdr, off).unwrap_or(0));
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (field(4), field(8), field(12), field(16), field(20));
        if hdr_len < HEADER_LEN as u64 {
            return Err(BtfError::BadHeader(format!(
                "hdr_len {hdr_len} is shorter than the {HEADER_LEN}-byte header"
            )));
        }
        if hdr_len > have {
            return Err(BtfError::Truncated {
                what: "the header (hdr_len)",
                need: hdr_len,
                have,
            });
        }
        // Each value is < 2^32, so these sums cannot overflow a u64.
        let section = |what, off: u64, len: u64| {
            let start = hdr_len + off;
            let end = start + len;
            if end > have {
                return Err(BtfError::Truncated {
                    what,
                    need: end,
                    have,
                });
            }
            blob.get(usize_from(start)..usize_from(end))
                .ok_or(BtfError::Truncated {
                    what,
                    need: end,
                    have,
                })
        };
        let type_sec = section("the type section", type_off, type_len)?;
        let str_sec = section("the string section", str_off, str_len)?;
        match (str_sec.first(), str_sec.last()) {
            (None, _) => return Err(BtfError::BadStrings("it is empty".into())),
            (Some(&first), _) if first != 0 => {
                return Err(BtfError::BadStrings(
                    "it does not start with the empty string".into(),
                ))
            }
            (_, Some(&last)) if last != 0 => {
                return Err(BtfError::BadStrings(
                    "its last string is not NUL-terminated".into(),
                ))
            }
            _ => {}
        }

        // Walk the type section. Every record is at least 12 bytes, which bounds the count.
        let max = (type_sec.len() / TYPE_HEADER_LEN).min(MAX_TYPES) + 1;
        let mut types = Vec::with_capacity(max);
        types.push(VOID);
        let mut pos = 0usize;
        while pos < type_sec.len() {
            let id = types.len();
            if id > MAX_TYPES {
                return Err(BtfError::TooManyTypes);
            }
            let id = u32_sat(id);
            let remaining = (type_sec.len() - pos) as u64;
            let word = |o: usize| le::u32_at(type_sec, pos + o);
            let (Some(name_off), Some(info), Some(size_or_type)) = (word(0), word(4), word(8))
            else {
                return Err(BtfError::Truncated {
                    what: "a type record",
                    need: (pos + TYPE_HEADER_LEN) as u64,
                    have: type_sec.len() as u64,
                });
            };
            let raw_kind = (info >> 24) & 0x1f;
            let kind =
                Kind::from_raw(raw_kind).ok_or(BtfError::UnknownKind { id, kind: raw_kind })?;
            let vlen = (info & 0xffff) as u16;
            let need = TYPE_HEADER_LEN + kind.trailing(vlen);
            if need as u64 > remaining {
                return Err(BtfError::TruncatedType {
                    id,
                    kind,
                    offset: u32_sat(pos),
                    need: need as u64,
                    have: remaining,
                });
            }
            types.push(RawType {
                name_off,
                size_or_type,
                extra: u32_sat(pos + TYPE_HEADER_LEN),
                vlen,
                kind,
                kflag: info >> 31 == 1,
            });
            pos += need;
        }

        let mut btf = Btf {
            types,
            data: type_sec.to_vec(),
            strings: str_sec.to_vec(),
            index: Vec::new(),
        };
        btf.validate()?;
        btf.build_index();
        Ok(btf)
    }

    /// Checks every string offset and type id in every record.
    fn validate(&self) -> Result<(), BtfError> {
        let count = self.types.len();
        for id in 1..u32_sat(count) {
            self.visit_refs(id, |slot| match slot {
                Slot::Name(pos) => {
                    let offset = self.word(pos)?;
                    if offset as usize >= self.strings.len() {
                        return Err(BtfError::StringOutOfRange {
                            id,
                            offset,
                            len: self.strings.len(),
                        });
                    }
                    Ok(())
                }
                Slot::Type(pos) => {
                    let target = self.word(pos)?;
                    if target as usize >= count {
                        return Err(BtfError::TypeOutOfRange { id, target, count });
                    }
                    Ok(())
                }
            })?;
        }
        Ok(())
    }

    fn build_index(&mut self) {
        let mut index = Vec::with_capacity(self.types.len());
        for (id, t) in self.types.iter().enumerate().skip(1) {
            let start = t.name_off as usize;
            if start == 0 {
                continue;
            }
            // validate() checked start < len, and the section ends with NUL.
            let Some(rest) = self.strings.get(start..) else {
                continue;
            };
            let len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            index.push((u32_sat(start), u32_sat(start + len), u32_sat(id)));
        }
        let strings = &self.strings;
        let key = |e: &(u32, u32, TypeId)| strings.get(e.0 as usize..e.1 as usize).unwrap_or(&[]);
        index.sort_unstable_by(|a, b| key(a).cmp(key(b)).then(a.2.cmp(&b.2)));
        self.index = index;
    }

    /// Calls `f` for every string offset and type id stored in record `id`.
    fn visit_refs(
        &self,
        id: TypeId,
        mut f: impl FnMut(Slot) -> Result<(), BtfError>,
    ) -> Result<(), BtfError> {
        let t = *self.ty(id)?;
        if t.kind == Kind::Void {
            return Ok(());
        }
        let hdr = t
            .extra
            .checked_sub(u32_sat(TYPE_HEADER_LEN))
            .ok_or(BtfError::Corrupt(t.extra))?;
        f(Slot::Name(hdr))?;
        if t.kind.is_alias()
            || matches!(
                t.kind,
                Kind::Ptr | Kind::Func | Kind::FuncProto | Kind::Var | Kind::DeclTag
            )
        {
            f(Slot::Type(hdr + 8))?;
        }
        // Record lengths were checked against the section, so these offsets stay below 4 GiB.
        let x = t.extra;
        let n = u32::from(t.vlen);
        match t.kind {
            Kind::Array => {
                f(Slot::Type(x))?;
                f(Slot::Type(x + 4))?;
            }
            Kind::Struct | Kind::Union => {
                for i in 0..n {
                    f(Slot::Name(x + 12 * i))?;
                    f(Slot::Type(x + 12 * i + 4))?;
                }
            }
            Kind::Enum => {
                for i in 0..n {
                    f(Slot::Name(x + 8 * i))?;
                }
            }
            Kind::Enum64 => {
                for i in 0..n {
                    f(Slot::Name(x + 12 * i))?;
                }
            }
            Kind::FuncProto => {
                for i in 0..n {
                    f(Slot::Name(x + 8 * i))?;
                    f(Slot::Type(x + 8 * i + 4))?;
                }
            }
            Kind::Datasec => {
                for i in 0..n {
                    f(Slot::Type(x + 12 * i))?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn ty(&self, id: TypeId) -> Result<&RawType, BtfError> {
        self.types.get(id as usize).ok_or(BtfError::UnknownType {
            id,
            count: self.types.len(),
        })
    }

    fn word(&self, pos: u32) -> Result<u32, BtfError> {
        le::u32_at(&self.data, pos as usize).ok_or(BtfError::Corrupt(pos))
    }

    fn str_bytes(&self, offset: u32) -> Result<&[u8], BtfError> {
        let rest = self
            .strings
            .get(offset as usize..)
            .ok_or(BtfError::StringOutOfRange {
                id: 0,
                offset,
                len: self.strings.len(),
            })?;
        let len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        Ok(&rest[..len])
    }

    fn str_at(&self, offset: u32) -> Result<&str, BtfError> {
        std::str::from_utf8(self.str_bytes(offset)?).map_err(|_| BtfError::NotUtf8(offset))
    }

    /// Number of types, including `void` (id 0); valid ids are `0..type_count()`.
    pub fn type_count(&self) -> usize {
        self.types.len()
    }

    /// The kind of type `id`.
    pub fn kind(&self, id: TypeId) -> Result<Kind, BtfError> {
        Ok(self.ty(id)?.kind)
    }

    /// The raw header fields of type `id`: its record count (`vlen`: members, enumerators,
    /// parameters) and its kind flag (bitfield encoding of a struct, signedness of an enum).
    pub fn counts(&self, id: TypeId) -> Result<(u16, bool), BtfError> {
        let t = self.ty(id)?;
        Ok((t.vlen, t.kflag))
    }

    /// The name of type `id` ("" if anonymous).
    pub fn name(&self, id: TypeId) -> Result<&str, BtfError> {
        self.str_at(self.ty(id)?.name_off)
    }

    /// All types called `name`, lowest id first.
    pub fn find(&self, name: &str) -> impl Iterator<Item = TypeId> + '_ {
        let key =
            |e: &(u32, u32, TypeId)| self.strings.get(e.0 as usize..e.1 as usize).unwrap_or(&[]);
        let start = self.index.partition_point(|e| key(e) < name.as_bytes());
        let end = self.index.partition_point(|e| key(e) <= name.as_bytes());
        self.index
            .get(start..end)
            .unwrap_or(&[])
            .iter()
            .map(|e| e.2)
    }

    /// The first type called `name` of kind `kind`.
    pub fn find_kind(&self, name: &str, kind: Kind) -> Option<TypeId> {
        self.find(name).find(|&id| self.kind(id) == Ok(kind))
    }

    /// Follows typedefs, qualifiers and type tags to the underlying type.
    pub fn resolve(&self, id: TypeId) -> Result<TypeId, BtfError> {
        let mut cur = id;
        for _ in 0..MAX_RESOLVE_STEPS {
            let t = self.ty(cur)?;
            if !t.kind.is_alias() {
                return Ok(cur);
            }
            cur = t.size_or_type;
        }
        Err(BtfError::ResolveLoop(id))
    }

    /// Size in bytes of type `id` (following typedefs and qualifiers; arrays multiply out).
    pub fn type_size(&self, id: TypeId) -> Result<u64, BtfError> {
        let mut cur = id;
        let mut factor: u64 = 1;
        for _ in 0..MAX_RESOLVE_STEPS {
            let t = *self.ty(cur)?;
            let unit = match t.kind {
                Kind::Int
                | Kind::Struct
                | Kind::Union
                | Kind::Enum
                | Kind::Enum64
                | Kind::Float
                | Kind::Datasec => u64::from(t.size_or_type),
                Kind::Ptr => POINTER_SIZE,
                Kind::Array => {
                    let a = self.array_info(cur)?;
                    factor = factor
                        .checked_mul(u64::from(a.len))
                        .ok_or(BtfError::Overflow(id))?;
                    cur = a.elem_type;
                    continue;
                }
                Kind::Var => {
                    cur = t.size_or_type;
                    continue;
                }
                k if k.is_alias() => {
                    cur = t.size_or_type;
                    continue;
                }
                kind => return Err(BtfError::NoSize { id: cur, kind }),
            };
            return unit.checked_mul(factor).ok_or(BtfError::Overflow(id));
        }
        Err(BtfError::ResolveLoop(id))
    }

    /// The target of pointer type `id` (after resolving `id` itself).
    pub fn pointee(&self, id: TypeId) -> Result<TypeId, BtfError> {
        let r = self.resolve(id)?;
        let t = self.ty(r)?;
        match t.kind {
            Kind::Ptr => Ok(t.size_or_type),
            found => Err(BtfError::WrongKind {
                id: r,
                expected: "pointer",
                found,
            }),
        }
    }

    /// The encoding of integer type `id` (not resolved: pass a resolved id).
    pub fn int_info(&self, id: TypeId) -> Result<IntInfo, BtfError> {
        let t = *self.ty(id)?;
        if t.kind != Kind::Int {
            return Err(BtfError::WrongKind {
                id,
                expected: "int",
                found: t.kind,
            });
        }
        let enc = self.word(t.extra)?;
        Ok(IntInfo {
            size: t.size_or_type,
            signed: enc & (1 << 24) != 0,
            char: enc & (2 << 24) != 0,
            bool: enc & (4 << 24) != 0,
            offset: (enc >> 16).to_le_bytes()[0],
            bits: enc.to_le_bytes()[0],
        })
    }

    /// Element type and length of array type `id` (not resolved: pass a resolved id).
    pub fn array_info(&self, id: TypeId) -> Result<ArrayInfo, BtfError> {
        let t = *self.ty(id)?;
        if t.kind != Kind::Array {
            return Err(BtfError::WrongKind {
                id,
                expected: "array",
                found: t.kind,
            });
        }
        Ok(ArrayInfo {
            elem_type: self.word(t.extra)?,
            index_type: self.word(t.extra + 4)?,
            len: self.word(t.extra + 8)?,
        })
    }
}

mod layout;
pub mod locate;
mod types;

pub use types::{ArrayInfo, IntInfo, Kind, Member, MemberKind, StructLayout};

#[cfg(test)]
pub(crate) mod encoder;
#[cfg(test)]
mod tests;
