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

use crate::elf::{self, ElfError};

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

/// The kind of a BTF type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Type id 0.
    Void,
    /// Integer (also char and bool).
    Int,
    /// Pointer.
    Ptr,
    /// Array.
    Array,
    /// Struct.
    Struct,
    /// Union.
    Union,
    /// Enum with values up to 32 bits.
    Enum,
    /// Forward declaration.
    Fwd,
    /// Typedef.
    Typedef,
    /// `volatile` qualifier.
    Volatile,
    /// `const` qualifier.
    Const,
    /// `restrict` qualifier.
    Restrict,
    /// Function (a subprogram, not a type).
    Func,
    /// Function prototype.
    FuncProto,
    /// Variable.
    Var,
    /// Data section.
    Datasec,
    /// Floating point.
    Float,
    /// Declaration tag.
    DeclTag,
    /// Type tag.
    TypeTag,
    /// Enum with 64-bit values.
    Enum64,
}

impl Kind {
    fn from_raw(k: u32) -> Option<Kind> {
        Some(match k {
            1 => Kind::Int,
            2 => Kind::Ptr,
            3 => Kind::Array,
            4 => Kind::Struct,
            5 => Kind::Union,
            6 => Kind::Enum,
            7 => Kind::Fwd,
            8 => Kind::Typedef,
            9 => Kind::Volatile,
            10 => Kind::Const,
            11 => Kind::Restrict,
            12 => Kind::Func,
            13 => Kind::FuncProto,
            14 => Kind::Var,
            15 => Kind::Datasec,
            16 => Kind::Float,
            17 => Kind::DeclTag,
            18 => Kind::TypeTag,
            19 => Kind::Enum64,
            _ => return None,
        })
    }

    /// Bytes of kind-specific data after the 12-byte `btf_type` (at most 12 * 0xffff).
    fn trailing(self, vlen: u16) -> usize {
        let vlen = usize::from(vlen);
        match self {
            Kind::Int | Kind::Var | Kind::DeclTag => 4,
            Kind::Array => 12,
            Kind::Struct | Kind::Union | Kind::Datasec | Kind::Enum64 => 12 * vlen,
            Kind::Enum | Kind::FuncProto => 8 * vlen,
            _ => 0,
        }
    }

    /// Whether this kind only qualifies or renames another type.
    fn is_alias(self) -> bool {
        matches!(
            self,
            Kind::Typedef | Kind::Volatile | Kind::Const | Kind::Restrict | Kind::TypeTag
        )
    }

    /// The C-ish name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Void => "void",
            Kind::Int => "int",
            Kind::Ptr => "pointer",
            Kind::Array => "array",
            Kind::Struct => "struct",
            Kind::Union => "union",
            Kind::Enum => "enum",
            Kind::Fwd => "forward declaration",
            Kind::Typedef => "typedef",
            Kind::Volatile => "volatile",
            Kind::Const => "const",
            Kind::Restrict => "restrict",
            Kind::Func => "function",
            Kind::FuncProto => "function prototype",
            Kind::Var => "variable",
            Kind::Datasec => "data section",
            Kind::Float => "float",
            Kind::DeclTag => "declaration tag",
            Kind::TypeTag => "type tag",
            Kind::Enum64 => "enum64",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// A type id, at this type-section offset; `via_ptr` when it is a pointer's target.
    Type {
        pos: u32,
        #[cfg_attr(not(test), allow(dead_code))]
        via_ptr: bool,
    },
}

/// An integer type's encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntInfo {
    /// Size in bytes.
    pub size: u32,
    /// Signed.
    pub signed: bool,
    /// `char`.
    pub char: bool,
    /// `_Bool`.
    pub bool: bool,
    /// Bit offset of the value (legacy bitfields; 0 in practice).
    pub offset: u8,
    /// Number of bits used.
    pub bits: u8,
}

/// An array type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArrayInfo {
    /// Element type, as declared (may be a typedef).
    pub elem_type: TypeId,
    /// Index type.
    pub index_type: TypeId,
    /// Number of elements (0 for flexible arrays).
    pub len: u32,
}

/// What a member is, after following typedefs and qualifiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberKind {
    /// An integer (including char and bool).
    Int {
        /// Signed.
        signed: bool,
    },
    /// A pointer.
    Pointer,
    /// An array.
    Array {
        /// Element type as declared (use [`Btf::resolve`] to look through typedefs).
        elem_type: TypeId,
        /// Size of one element in bytes.
        elem_size: u64,
        /// Number of elements (0 for a flexible array).
        len: u32,
    },
    /// An embedded struct ("" if anonymous, e.g. `kuid_t`).
    Struct(String),
    /// An embedded union ("" if anonymous).
    Union(String),
    /// An enum.
    Enum,
    /// Anything else (float, function pointer prototype...).
    Other,
}

/// One member of a struct, with anonymous struct/union members flattened into their parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Name.
    pub name: String,
    /// Offset from the start of the outermost struct, in bits.
    pub offset_bits: u64,
    /// Width if a bitfield, else 0.
    pub bitfield_bits: u32,
    /// Type as declared.
    pub type_id: TypeId,
    /// Size in bytes of the resolved type (the storage unit's size for a bitfield).
    pub size: u64,
    /// What it is.
    pub kind: MemberKind,
}

/// The layout of a struct or union.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StructLayout {
    /// Name ("" if anonymous).
    pub name: String,
    /// Its type id.
    pub type_id: TypeId,
    /// A union rather than a struct.
    pub is_union: bool,
    /// Size in bytes.
    pub size: u64,
    /// Members in declaration order, anonymous struct/union members flattened.
    pub members: Vec<Member>,
}

impl StructLayout {
    /// The member called `name`.
    pub fn member(&self, name: &str) -> Result<&Member, BtfError> {
        self.members
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| BtfError::NoMember {
                structure: self.name.clone(),
                member: name.to_owned(),
            })
    }

    /// Whether a member called `name` exists (to pick between kernel versions).
    pub fn has(&self, name: &str) -> bool {
        self.members.iter().any(|m| m.name == name)
    }

    /// Byte offset of member `name`; an error if it is missing or a bitfield.
    pub fn offset(&self, name: &str) -> Result<u64, BtfError> {
        let m = self.member(name)?;
        if m.bitfield_bits != 0 || m.offset_bits % 8 != 0 {
            return Err(BtfError::Bitfield {
                structure: self.name.clone(),
                member: name.to_owned(),
                offset_bits: m.offset_bits,
                bits: m.bitfield_bits,
            });
        }
        Ok(m.offset_bits / 8)
    }
}

/// Parsed BTF: types, strings and a name index. Owns its data.
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

fn le32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
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
        let magic = u16::from_le_bytes([hdr[0], hdr[1]]);
        if magic == MAGIC.swap_bytes() {
            return Err(BtfError::BigEndian);
        }
        if magic != MAGIC {
            return Err(BtfError::BadMagic(magic));
        }
        if hdr[2] != VERSION {
            return Err(BtfError::Version(hdr[2]));
        }
        let field = |off| u64::from(le32(hdr, off).unwrap_or(0));
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
            // start <= end <= blob.len(), so both fit in usize.
            blob.get(start as usize..end as usize)
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
            let id = id as TypeId;
            let remaining = (type_sec.len() - pos) as u64;
            let word = |o: usize| le32(type_sec, pos + o);
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
                    offset: pos as u32,
                    need: need as u64,
                    have: remaining,
                });
            }
            types.push(RawType {
                name_off,
                size_or_type,
                // The type section is at most 4 GiB (its length is a u32).
                extra: (pos + TYPE_HEADER_LEN) as u32,
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
        for id in 1..count as TypeId {
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
                Slot::Type { pos, .. } => {
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
            index.push((start as u32, (start + len) as u32, id as TypeId));
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
            .checked_sub(TYPE_HEADER_LEN as u32)
            .ok_or(BtfError::Corrupt(t.extra))?;
        f(Slot::Name(hdr))?;
        if t.kind.is_alias()
            || matches!(
                t.kind,
                Kind::Ptr | Kind::Func | Kind::FuncProto | Kind::Var | Kind::DeclTag
            )
        {
            f(Slot::Type {
                pos: hdr + 8,
                via_ptr: t.kind == Kind::Ptr,
            })?;
        }
        // Record lengths were checked against the section, so these offsets stay below 4 GiB.
        let x = t.extra;
        let n = u32::from(t.vlen);
        match t.kind {
            Kind::Array => {
                f(Slot::Type {
                    pos: x,
                    via_ptr: false,
                })?;
                f(Slot::Type {
                    pos: x + 4,
                    via_ptr: false,
                })?;
            }
            Kind::Struct | Kind::Union => {
                for i in 0..n {
                    f(Slot::Name(x + 12 * i))?;
                    f(Slot::Type {
                        pos: x + 12 * i + 4,
                        via_ptr: false,
                    })?;
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
                    f(Slot::Type {
                        pos: x + 8 * i + 4,
                        via_ptr: false,
                    })?;
                }
            }
            Kind::Datasec => {
                for i in 0..n {
                    f(Slot::Type {
                        pos: x + 12 * i,
                        via_ptr: false,
                    })?;
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
        le32(&self.data, pos as usize).ok_or(BtfError::Corrupt(pos))
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
            offset: (enc >> 16) as u8,
            bits: enc as u8,
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

    /// The layout of the struct or union called `name`. When several types share the name, the
    /// first complete definition with members wins, then an empty one; a forward declaration
    /// alone is an error.
    pub fn struct_layout(&self, name: &str) -> Result<StructLayout, BtfError> {
        let mut empty = None;
        let mut forward = false;
        for id in self.find(name) {
            let t = self.ty(id)?;
            match t.kind {
                Kind::Struct | Kind::Union if t.vlen > 0 => return self.struct_layout_by_id(id),
                Kind::Struct | Kind::Union => {
                    empty.get_or_insert(id);
                }
                Kind::Fwd => forward = true,
                _ => {}
            }
        }
        match empty {
            Some(id) => self.struct_layout_by_id(id),
            None if forward => Err(BtfError::Incomplete(name.to_owned())),
            None => Err(BtfError::NotFound {
                what: "struct or union",
                name: name.to_owned(),
            }),
        }
    }

    /// The layout of struct or union type `id` (typedefs are followed).
    pub fn struct_layout_by_id(&self, id: TypeId) -> Result<StructLayout, BtfError> {
        let id = self.resolve(id)?;
        let t = *self.ty(id)?;
        let is_union = match t.kind {
            Kind::Struct => false,
            Kind::Union => true,
            Kind::Fwd => return Err(BtfError::Incomplete(self.name(id)?.to_owned())),
            found => {
                return Err(BtfError::WrongKind {
                    id,
                    expected: "struct or union",
                    found,
                })
            }
        };
        let name = self.name(id)?.to_owned();
        let size = u64::from(t.size_or_type);
        let mut members = Vec::new();
        let mut budget = MAX_FLAT_MEMBERS;
        self.flatten(id, 0, 0, &name, &mut budget, &mut members)?;
        for m in &members {
            let size_bits = if m.bitfield_bits != 0 {
                u64::from(m.bitfield_bits)
            } else {
                m.size.saturating_mul(8)
            };
            if m.offset_bits.saturating_add(size_bits) > size.saturating_mul(8) {
                return Err(BtfError::MemberOutside {
                    structure: name,
                    member: m.name.clone(),
                    offset_bits: m.offset_bits,
                    size_bits,
                    size,
                });
            }
        }
        Ok(StructLayout {
            name,
            type_id: id,
            is_union,
            size,
            members,
        })
    }

    /// Appends the members of struct/union `id` (at bit offset `base`) to `out`, descending into
    /// anonymous struct/union members.
    fn flatten(
        &self,
        id: TypeId,
        base: u64,
        depth: u32,
        owner: &str,
        budget: &mut u32,
        out: &mut Vec<Member>,
    ) -> Result<(), BtfError> {
        if depth > MAX_ANON_DEPTH {
            return Err(BtfError::TooManyMembers(owner.to_owned()));
        }
        let t = *self.ty(id)?;
        for i in 0..u32::from(t.vlen) {
            *budget = budget
                .checked_sub(1)
                .ok_or_else(|| BtfError::TooManyMembers(owner.to_owned()))?;
            let rec = t.extra + 12 * i;
            let (name_off, type_id, raw_off) =
                (self.word(rec)?, self.word(rec + 4)?, self.word(rec + 8)?);
            let name = self.str_at(name_off)?;
            let ctx = |e: BtfError| BtfError::InMember {
                structure: owner.to_owned(),
                member: if name.is_empty() {
                    "<anonymous>".to_owned()
                } else {
                    name.to_owned()
                },
                source: Box::new(e),
            };
            let (mut bit_off, mut bits) = if t.kflag {
                (raw_off & 0x00ff_ffff, raw_off >> 24)
            } else {
                (raw_off, 0)
            };
            let resolved = self.resolve(type_id).map_err(ctx)?;
            let rt = *self.ty(resolved)?;
            if !t.kflag && rt.kind == Kind::Int {
                // Legacy encoding: the bitfield lives in the int type itself.
                let int = self.int_info(resolved)?;
                if int.offset != 0 || u64::from(int.bits) != u64::from(int.size) * 8 {
                    bit_off = bit_off.saturating_add(u32::from(int.offset));
                    bits = u32::from(int.bits);
                }
            }
            let offset_bits = base
                .checked_add(u64::from(bit_off))
                .ok_or_else(|| ctx(BtfError::Overflow(id)))?;
            if name.is_empty() {
                if matches!(rt.kind, Kind::Struct | Kind::Union) {
                    self.flatten(resolved, offset_bits, depth + 1, owner, budget, out)?;
                }
                continue;
            }
            let size = self.type_size(type_id).map_err(ctx)?;
            let kind = self.member_kind(resolved).map_err(ctx)?;
            out.push(Member {
                name: name.to_owned(),
                offset_bits,
                bitfield_bits: bits,
                type_id,
                size,
                kind,
            });
        }
        Ok(())
    }

    fn member_kind(&self, resolved: TypeId) -> Result<MemberKind, BtfError> {
        let t = *self.ty(resolved)?;
        Ok(match t.kind {
            Kind::Int => MemberKind::Int {
                signed: self.int_info(resolved)?.signed,
            },
            Kind::Ptr => MemberKind::Pointer,
            Kind::Array => {
                let a = self.array_info(resolved)?;
                MemberKind::Array {
                    elem_type: a.elem_type,
                    elem_size: self.type_size(a.elem_type)?,
                    len: a.len,
                }
            }
            Kind::Struct => MemberKind::Struct(self.name(resolved)?.to_owned()),
            Kind::Union => MemberKind::Union(self.name(resolved)?.to_owned()),
            Kind::Enum | Kind::Enum64 => MemberKind::Enum,
            _ => MemberKind::Other,
        })
    }

    /// Byte offset of `path` in struct `structure`. `path` is a member name, or a dotted path
    /// through embedded (not pointed-to) structs and unions, e.g. `"uid.val"` in `cred`.
    pub fn field_offset(&self, structure: &str, path: &str) -> Result<u64, BtfError> {
        let mut layout = self.struct_layout(structure)?;
        let mut total: u64 = 0;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            total = total
                .checked_add(layout.offset(part)?)
                .ok_or(BtfError::Overflow(layout.type_id))?;
            if parts.peek().is_some() {
                let m = layout.member(part)?;
                if !matches!(m.kind, MemberKind::Struct(_) | MemberKind::Union(_)) {
                    return Err(BtfError::NotEmbedded {
                        structure: layout.name.clone(),
                        member: part.to_owned(),
                    });
                }
                let next = m.type_id;
                layout = self.struct_layout_by_id(next)?;
                if layout.name.is_empty() {
                    layout.name = format!("{structure}.{part}");
                }
            }
        }
        Ok(total)
    }

    /// Value of `constant` in enum type `id`, if it has it.
    fn enumerator(&self, id: TypeId, constant: &str) -> Result<Option<i128>, BtfError> {
        let t = *self.ty(id)?;
        let n = u32::from(t.vlen);
        match t.kind {
            Kind::Enum => {
                for i in 0..n {
                    let rec = t.extra + 8 * i;
                    if self.str_bytes(self.word(rec)?)? == constant.as_bytes() {
                        let raw = self.word(rec + 4)?;
                        return Ok(Some(if t.kflag {
                            i128::from(raw as i32)
                        } else {
                            i128::from(raw)
                        }));
                    }
                }
                Ok(None)
            }
            Kind::Enum64 => {
                for i in 0..n {
                    let rec = t.extra + 12 * i;
                    if self.str_bytes(self.word(rec)?)? == constant.as_bytes() {
                        let raw =
                            u64::from(self.word(rec + 4)?) | (u64::from(self.word(rec + 8)?) << 32);
                        return Ok(Some(if t.kflag {
                            i128::from(raw as i64)
                        } else {
                            i128::from(raw)
                        }));
                    }
                }
                Ok(None)
            }
            found => Err(BtfError::WrongKind {
                id,
                expected: "enum",
                found,
            }),
        }
    }

    /// Value of enumerator `constant` of the enum called `enum_name`
    /// (e.g. `("pid_type", "PIDTYPE_PID")`). Signedness follows the enum's kind flag.
    pub fn enum_value(&self, enum_name: &str, constant: &str) -> Result<i128, BtfError> {
        let mut seen = false;
        for id in self.find(enum_name) {
            if matches!(self.kind(id)?, Kind::Enum | Kind::Enum64) {
                seen = true;
                if let Some(v) = self.enumerator(id, constant)? {
                    return Ok(v);
                }
            }
        }
        if seen {
            Err(BtfError::NoEnumerator {
                enum_name: enum_name.to_owned(),
                constant: constant.to_owned(),
            })
        } else {
            Err(BtfError::NotFound {
                what: "enum",
                name: enum_name.to_owned(),
            })
        }
    }

    /// Value of enumerator `constant` in whichever enum defines it, for constants of anonymous
    /// enums such as `NR_MM_COUNTERS`. Scans every enum; an error if two disagree.
    pub fn enum_constant(&self, constant: &str) -> Result<i128, BtfError> {
        let mut found = None;
        for (id, t) in self.types.iter().enumerate() {
            if !matches!(t.kind, Kind::Enum | Kind::Enum64) {
                continue;
            }
            if let Some(v) = self.enumerator(id as TypeId, constant)? {
                match found {
                    Some(prev) if prev != v => {
                        return Err(BtfError::Ambiguous(constant.to_owned()))
                    }
                    _ => found = Some(v),
                }
            }
        }
        found.ok_or_else(|| BtfError::NoEnumerator {
            enum_name: String::new(),
            constant: constant.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    // ---------------------------------------------------------------- a small BTF encoder

    /// Builds BTF blobs type by type; ids are handed out in order from 1.
    struct B {
        types: Vec<u8>,
        strs: Vec<u8>,
        next: u32,
    }

    impl B {
        fn new() -> B {
            B {
                types: Vec::new(),
                strs: vec![0],
                next: 1,
            }
        }

        fn s(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strs.len() as u32;
            self.strs.extend_from_slice(s.as_bytes());
            self.strs.push(0);
            off
        }

        /// The id the next type will get.
        fn peek(&self) -> u32 {
            self.next
        }

        fn raw(&mut self, name_off: u32, info: u32, st: u32, extra: &[u32]) -> u32 {
            for w in [name_off, info, st].iter().chain(extra) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            self.next += 1;
            self.next - 1
        }

        fn ty(
            &mut self,
            name: &str,
            kind: u32,
            vlen: u32,
            kflag: bool,
            st: u32,
            extra: &[u32],
        ) -> u32 {
            let n = self.s(name);
            self.raw(n, (u32::from(kflag) << 31) | (kind << 24) | vlen, st, extra)
        }

        fn int(&mut self, name: &str, size: u32, signed: bool) -> u32 {
            self.ty(
                name,
                1,
                0,
                false,
                size,
                &[(u32::from(signed) << 24) | (size * 8)],
            )
        }

        fn int_bits(&mut self, name: &str, size: u32, bits: u32) -> u32 {
            self.ty(name, 1, 0, false, size, &[bits])
        }

        fn ptr(&mut self, t: u32) -> u32 {
            self.ty("", 2, 0, false, t, &[])
        }

        fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
            self.ty("", 3, 0, false, 0, &[elem, index, n])
        }

        /// Members are (name, type, bit offset, bitfield bits).
        fn aggregate(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let kflag = members.iter().any(|m| m.3 != 0);
            let mut words = Vec::new();
            for &(n, t, off, bits) in members {
                words.push(self.s(n));
                words.push(t);
                words.push(if kflag { (bits << 24) | off } else { off });
            }
            self.ty(name, kind, members.len() as u32, kflag, size, &words)
        }

        fn struct_(&mut self, name: &str, size: u32, members: &[(&str, u32, u32, u32)]) -> u32 {
            self.aggregate(4, name, size, members)
        }

        fn union_(&mut self, name: &str, size: u32, members: &[(&str, u32, u32, u32)]) -> u32 {
            self.aggregate(5, name, size, members)
        }

        fn enum_(&mut self, name: &str, signed: bool, vals: &[(&str, i32)]) -> u32 {
            let mut words = Vec::new();
            for &(n, v) in vals {
                words.push(self.s(n));
                words.push(v as u32);
            }
            self.ty(name, 6, vals.len() as u32, signed, 4, &words)
        }

        fn enum64(&mut self, name: &str, signed: bool, vals: &[(&str, u64)]) -> u32 {
            let mut words = Vec::new();
            for &(n, v) in vals {
                words.push(self.s(n));
                words.push(v as u32);
                words.push((v >> 32) as u32);
            }
            self.ty(name, 19, vals.len() as u32, signed, 8, &words)
        }

        fn fwd(&mut self, name: &str, union: bool) -> u32 {
            self.ty(name, 7, 0, union, 0, &[])
        }

        fn typedef(&mut self, name: &str, t: u32) -> u32 {
            self.ty(name, 8, 0, false, t, &[])
        }

        fn func_proto(&mut self, ret: u32, params: &[(&str, u32)]) -> u32 {
            let mut words = Vec::new();
            for &(n, t) in params {
                words.push(self.s(n));
                words.push(t);
            }
            self.ty("", 13, params.len() as u32, false, ret, &words)
        }

        fn datasec(&mut self, name: &str, size: u32, vars: &[(u32, u32, u32)]) -> u32 {
            let words: Vec<u32> = vars.iter().flat_map(|&(t, o, s)| [t, o, s]).collect();
            self.ty(name, 15, vars.len() as u32, false, size, &words)
        }

        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.push(VERSION);
            out.push(0);
            let tl = self.types.len() as u32;
            for w in [24, 0, tl, tl, self.strs.len() as u32] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strs);
            out
        }
    }

    fn put32(blob: &mut [u8], off: usize, v: u32) {
        blob[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// A blob with every kind, bitfields, anonymous members, duplicates and enums.
    fn sample() -> Vec<u8> {
        let mut b = B::new();
        let int = b.int("int", 4, true);
        let uint = b.int("unsigned int", 4, false);
        let ulong = b.int("long unsigned int", 8, false);
        let chr = b.int("char", 1, true);
        let pid_t = b.typedef("pid_t", int);
        let list_head = b.peek();
        b.struct_(
            "list_head",
            16,
            &[
                ("next", list_head + 1, 0, 0),
                ("prev", list_head + 1, 64, 0),
            ],
        );
        b.ptr(list_head);
        let vol_uint = b.ty("", 9, 0, false, uint, &[]);
        let kuid = b.struct_("", 4, &[("val", uint, 0, 0)]);
        let kuid_t = b.typedef("kuid_t", kuid);
        let cred = b.struct_("cred", 8, &[("uid", kuid_t, 0, 0), ("euid", kuid_t, 32, 0)]);
        let const_cred = b.ty("", 10, 0, false, cred, &[]);
        let rcu = b.ty("rcu", 18, 0, false, const_cred, &[]);
        let cred_ptr = b.ptr(rcu);
        let mm_fwd = b.fwd("mm_struct", false);
        let mm_ptr = b.ptr(mm_fwd);
        let comm = b.array(chr, int, 16);
        let pid_type = b.enum_(
            "pid_type",
            false,
            &[("PIDTYPE_PID", 0), ("PIDTYPE_TGID", 1), ("PIDTYPE_MAX", 4)],
        );
        b.enum_("", false, &[("NR_MM_COUNTERS", 4)]);
        b.enum_("neg", true, &[("MINUS_ONE", -1)]);
        b.enum64("big", false, &[("BIG", 0xffff_ffff_ffff_fff0)]);
        b.enum64("big_signed", true, &[("NEG5", (-5i64) as u64)]);
        let bits = b.struct_("", 4, &[("a", uint, 0, 3), ("b", uint, 3, 5)]);
        let anon_union = b.union_("", 8, &[("whole", ulong, 0, 0), ("", bits, 0, 0)]);
        let counts = b.array(ulong, int, 4);
        let double = b.ty("double", 16, 0, false, 8, &[]);
        let proto = b.func_proto(int, &[("x", int), ("", 0)]);
        b.ty("do_it", 12, 1, false, proto, &[]);
        let fnptr = b.ptr(proto);
        let task = b.struct_(
            "task_struct",
            128,
            &[
                ("__state", vol_uint, 0, 0),
                ("pid", pid_t, 32, 0),
                ("tgid", pid_t, 64, 0),
                ("", anon_union, 128, 0),
                ("comm", comm, 192, 0),
                ("tasks", list_head, 320, 0),
                ("cred", cred_ptr, 448, 0),
                ("mm", mm_ptr, 512, 0),
                ("type", pid_type, 576, 0),
                ("counts", counts, 640, 0),
                ("ratio", double, 896, 0),
                ("hook", fnptr, 960, 0),
            ],
        );
        b.typedef("task_t", task);
        b.struct_("dup", 0, &[]);
        b.fwd("dup", false);
        b.struct_("dup", 8, &[("x", ulong, 0, 0)]);
        b.fwd("only_fwd", true);
        let int3 = b.int_bits("unsigned int", 4, 3);
        // Legacy bitfield encoding: kind_flag 0, the width in the int type.
        b.struct_("legacy", 8, &[("lo", int3, 3, 0), ("word", uint, 32, 0)]);
        let var = b.ty("init_task", 14, 0, false, task, &[1]);
        b.datasec(".data", 128, &[(var, 0, 128)]);
        let int_ptr = b.ptr(int);
        b.ty("", 11, 0, false, int_ptr, &[]);
        b.ty("user", 17, 0, false, task, &[0]);
        b.ty("btf_decl", 17, 0, false, task, &[u32::MAX]);
        b.build()
    }

    fn id_of(btf: &Btf, name: &str, kind: Kind) -> TypeId {
        btf.find_kind(name, kind)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    #[test]
    fn sample_layout_flattens_and_decodes() {
        let btf = Btf::parse(&sample()).unwrap();
        let task = btf.struct_layout("task_struct").unwrap();
        assert_eq!(task.size, 128);
        assert!(!task.is_union);
        let names: Vec<&str> = task.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "__state", "pid", "tgid", "whole", "a", "b", "comm", "tasks", "cred", "mm", "type",
                "counts", "ratio", "hook"
            ]
        );
        let off = |n| task.offset(n).unwrap();
        assert_eq!(
            [
                off("__state"),
                off("pid"),
                off("tgid"),
                off("whole"),
                off("comm"),
                off("tasks")
            ],
            [0, 4, 8, 16, 24, 40]
        );
        assert_eq!(
            [
                off("cred"),
                off("mm"),
                off("type"),
                off("counts"),
                off("ratio"),
                off("hook")
            ],
            [56, 64, 72, 80, 112, 120]
        );

        let a = task.member("a").unwrap();
        assert_eq!((a.offset_bits, a.bitfield_bits, a.size), (128, 3, 4));
        let b = task.member("b").unwrap();
        assert_eq!((b.offset_bits, b.bitfield_bits), (131, 5));
        let e = task.offset("b").unwrap_err();
        assert!(matches!(e, BtfError::Bitfield { .. }));
        assert!(e.to_string().contains("task_struct.b"), "{e}");
        let e = task.offset("nope").unwrap_err();
        assert_eq!(
            e.to_string(),
            "struct task_struct has no member \"nope\" in this kernel"
        );
        assert!(task.has("pid") && !task.has("nope"));

        let m = |n| task.member(n).unwrap().clone();
        assert_eq!(
            (m("__state").kind, m("__state").size),
            (MemberKind::Int { signed: false }, 4)
        );
        assert_eq!(m("pid").kind, MemberKind::Int { signed: true });
        let chr = id_of(&btf, "char", Kind::Int);
        assert_eq!(
            m("comm").kind,
            MemberKind::Array {
                elem_type: chr,
                elem_size: 1,
                len: 16
            }
        );
        assert_eq!(m("comm").size, 16);
        assert_eq!(
            (m("tasks").kind, m("tasks").size),
            (MemberKind::Struct("list_head".into()), 16)
        );
        assert_eq!((m("cred").kind, m("cred").size), (MemberKind::Pointer, 8));
        assert_eq!(m("type").kind, MemberKind::Enum);
        assert_eq!(m("counts").size, 32);
        assert!(matches!(
            m("counts").kind,
            MemberKind::Array {
                elem_size: 8,
                len: 4,
                ..
            }
        ));
        assert_eq!(m("ratio").kind, MemberKind::Other);
        assert_eq!(m("hook").kind, MemberKind::Pointer);
        assert_eq!(m("whole").kind, MemberKind::Int { signed: false });

        // Pointers lead through type tags and const to the struct.
        let cred = btf
            .resolve(btf.pointee(m("cred").type_id).unwrap())
            .unwrap();
        assert_eq!(btf.name(cred).unwrap(), "cred");
        assert_eq!(
            btf.kind(btf.pointee(m("mm").type_id).unwrap()).unwrap(),
            Kind::Fwd
        );

        // Dotted paths through embedded structs; pointers are refused.
        assert_eq!(btf.field_offset("task_struct", "tasks").unwrap(), 40);
        assert_eq!(btf.field_offset("task_struct", "tasks.prev").unwrap(), 48);
        assert_eq!(btf.field_offset("cred", "euid.val").unwrap(), 4);
        assert!(matches!(
            btf.field_offset("task_struct", "cred.uid"),
            Err(BtfError::NotEmbedded { .. })
        ));
        assert!(matches!(
            btf.field_offset("task_struct", "tasks.nope"),
            Err(BtfError::NoMember { .. })
        ));

        // Via a typedef id.
        let task_t = id_of(&btf, "task_t", Kind::Typedef);
        assert_eq!(btf.struct_layout_by_id(task_t).unwrap(), task);
    }

    #[test]
    fn sample_lookups() {
        let btf = Btf::parse(&sample()).unwrap();
        // Duplicates: the definition with members wins over an empty one and a forward.
        let dup = btf.struct_layout("dup").unwrap();
        assert_eq!((dup.size, dup.members.len()), (8, 1));
        assert_eq!(btf.find("dup").count(), 3);
        assert_eq!(
            btf.struct_layout("only_fwd"),
            Err(BtfError::Incomplete("only_fwd".into()))
        );
        assert!(matches!(
            btf.struct_layout("nothing"),
            Err(BtfError::NotFound { .. })
        ));
        assert!(matches!(
            btf.struct_layout("pid_t"),
            Err(BtfError::NotFound { .. })
        ));

        // Legacy (kind_flag 0) bitfields.
        let legacy = btf.struct_layout("legacy").unwrap();
        let lo = legacy.member("lo").unwrap();
        assert_eq!((lo.offset_bits, lo.bitfield_bits), (3, 3));
        assert_eq!(legacy.offset("word").unwrap(), 4);

        // Enums.
        assert_eq!(btf.enum_value("pid_type", "PIDTYPE_PID").unwrap(), 0);
        assert_eq!(btf.enum_value("pid_type", "PIDTYPE_MAX").unwrap(), 4);
        assert_eq!(btf.enum_constant("NR_MM_COUNTERS").unwrap(), 4);
        assert_eq!(btf.enum_value("neg", "MINUS_ONE").unwrap(), -1);
        assert_eq!(btf.enum_value("big", "BIG").unwrap(), 0xffff_ffff_ffff_fff0);
        assert_eq!(btf.enum_value("big_signed", "NEG5").unwrap(), -5);
        assert!(matches!(
            btf.enum_value("pid_type", "NOPE"),
            Err(BtfError::NoEnumerator { .. })
        ));
        assert!(matches!(
            btf.enum_value("nope", "X"),
            Err(BtfError::NotFound { .. })
        ));
        assert!(matches!(
            btf.enum_constant("NOPE"),
            Err(BtfError::NoEnumerator { .. })
        ));

        // Sizes of every kind.
        let size = |n, k| btf.type_size(id_of(&btf, n, k));
        assert_eq!(size("init_task", Kind::Var), Ok(128));
        assert_eq!(size(".data", Kind::Datasec), Ok(128));
        assert_eq!(size("task_t", Kind::Typedef), Ok(128));
        assert_eq!(size("double", Kind::Float), Ok(8));
        assert_eq!(size("big", Kind::Enum64), Ok(8));
        assert!(matches!(
            size("do_it", Kind::Func),
            Err(BtfError::NoSize { .. })
        ));
        assert!(matches!(
            size("only_fwd", Kind::Fwd),
            Err(BtfError::NoSize { .. })
        ));
        assert!(matches!(
            btf.type_size(0),
            Err(BtfError::NoSize {
                kind: Kind::Void,
                ..
            })
        ));
        assert_eq!(btf.kind(0), Ok(Kind::Void));
        assert!(matches!(
            btf.kind(100_000),
            Err(BtfError::UnknownType { id: 100_000, .. })
        ));
        assert!(matches!(
            btf.type_size(100_000),
            Err(BtfError::UnknownType { id: 100_000, .. })
        ));
        assert!(matches!(
            btf.struct_layout_by_id(100_000),
            Err(BtfError::UnknownType { id: 100_000, .. })
        ));
        let int = id_of(&btf, "int", Kind::Int);
        assert!(btf.int_info(int).unwrap().signed);
        assert!(matches!(
            btf.array_info(int),
            Err(BtfError::WrongKind { .. })
        ));
        assert!(matches!(btf.pointee(int), Err(BtfError::WrongKind { .. })));
        assert!(matches!(
            btf.struct_layout_by_id(int),
            Err(BtfError::WrongKind { .. })
        ));
        let tagged = (0..btf.type_count() as TypeId)
            .filter(|&i| btf.kind(i) == Ok(Kind::DeclTag))
            .count();
        assert_eq!(tagged, 2);
    }

    fn header_blob(f: impl FnOnce(&mut Vec<u8>)) -> Result<Btf, BtfError> {
        let mut blob = sample();
        f(&mut blob);
        Btf::parse(&blob)
    }

    #[test]
    fn malformed_headers_are_errors() {
        let blob = sample();
        for n in 0..blob.len() {
            assert!(Btf::parse(&blob[..n]).is_err(), "truncated to {n} bytes");
        }
        assert!(matches!(
            Btf::parse(&blob[..10]),
            Err(BtfError::Truncated { .. })
        ));
        assert!(matches!(
            header_blob(|b| b[0] = 0),
            Err(BtfError::BadMagic(_))
        ));
        assert!(matches!(
            header_blob(|b| b.swap(0, 1)),
            Err(BtfError::BigEndian)
        ));
        assert_eq!(header_blob(|b| b[2] = 2).unwrap_err(), BtfError::Version(2));
        assert!(matches!(
            header_blob(|b| put32(b, 4, 8)),
            Err(BtfError::BadHeader(_))
        ));
        assert!(matches!(
            header_blob(|b| put32(b, 4, u32::MAX)),
            Err(BtfError::Truncated { .. })
        ));
        assert!(matches!(
            header_blob(|b| put32(b, 12, u32::MAX)),
            Err(BtfError::Truncated { .. })
        ));
        assert!(matches!(
            header_blob(|b| put32(b, 8, u32::MAX)),
            Err(BtfError::Truncated { .. })
        ));
        assert!(matches!(
            header_blob(|b| put32(b, 16, u32::MAX)),
            Err(BtfError::Truncated { .. })
        ));
        assert!(matches!(
            header_blob(|b| put32(b, 20, u32::MAX)),
            Err(BtfError::Truncated { .. })
        ));
        // String section: empty, not starting with "", not NUL-terminated.
        assert!(matches!(
            header_blob(|b| put32(b, 20, 0)),
            Err(BtfError::BadStrings(_))
        ));
        let str_start = 24 + u32::from_le_bytes(blob[16..20].try_into().unwrap()) as usize;
        assert!(matches!(
            header_blob(|b| b[str_start] = b'x'),
            Err(BtfError::BadStrings(_))
        ));
        assert!(matches!(
            header_blob(|b| *b.last_mut().unwrap() = b'x'),
            Err(BtfError::BadStrings(_))
        ));
        // A longer header whose extra bytes shift the sections is fine.
        let mut longer = blob[..24].to_vec();
        put32(&mut longer, 4, 32);
        longer.extend_from_slice(&[0; 8]);
        longer.extend_from_slice(&blob[24..]);
        assert!(Btf::parse(&longer).is_ok());
        // A type section that ends mid-record.
        assert!(matches!(
            header_blob(|b| {
                let tl = u32::from_le_bytes(b[12..16].try_into().unwrap());
                put32(b, 12, tl - 5);
            }),
            Err(BtfError::Truncated { .. } | BtfError::TruncatedType { .. })
        ));
    }

    #[test]
    fn malformed_types_are_errors() {
        let one = |f: &dyn Fn(&mut B)| {
            let mut b = B::new();
            f(&mut b);
            Btf::parse(&b.build())
        };
        // String offset out of range: type name, member name, enumerator name.
        let e = one(&|b| {
            b.raw(9999, 1 << 24, 4, &[32]);
        })
        .unwrap_err();
        assert!(
            matches!(
                e,
                BtfError::StringOutOfRange {
                    id: 1,
                    offset: 9999,
                    ..
                }
            ),
            "{e}"
        );
        let e = one(&|b| {
            let int = b.int("int", 4, true);
            b.ty("s", 4, 1, false, 4, &[5000, int, 0]);
        })
        .unwrap_err();
        assert!(matches!(e, BtfError::StringOutOfRange { id: 2, .. }), "{e}");
        assert!(matches!(
            one(&|b| {
                b.ty("e", 6, 1, false, 4, &[777, 0]);
            }),
            Err(BtfError::StringOutOfRange { .. })
        ));
        // Type id out of range: pointer, member, array element, datasec entry, proto param.
        let e = one(&|b| {
            b.ptr(999);
        })
        .unwrap_err();
        assert_eq!(
            e,
            BtfError::TypeOutOfRange {
                id: 1,
                target: 999,
                count: 2
            }
        );
        assert!(e.to_string().contains("[999]"));
        assert!(matches!(
            one(&|b| {
                b.struct_("s", 4, &[("x", 7, 0, 0)]);
            }),
            Err(BtfError::TypeOutOfRange { .. })
        ));
        assert!(matches!(
            one(&|b| {
                b.array(1, 0, 3);
                b.array(0, 9, 3);
            }),
            Err(BtfError::TypeOutOfRange { .. })
        ));
        assert!(matches!(
            one(&|b| {
                b.datasec(".d", 4, &[(42, 0, 4)]);
            }),
            Err(BtfError::TypeOutOfRange { .. })
        ));
        assert!(matches!(
            one(&|b| {
                b.func_proto(0, &[("x", 42)]);
            }),
            Err(BtfError::TypeOutOfRange { .. })
        ));
        // Absurd vlen: a struct announcing 65535 members with none present.
        let e = one(&|b| {
            b.ty("s", 4, 0xffff, false, 4, &[]);
        })
        .unwrap_err();
        assert!(
            matches!(
                e,
                BtfError::TruncatedType {
                    id: 1,
                    kind: Kind::Struct,
                    need: 786_432,
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(
            one(&|b| {
                b.ty("e", 19, 0xffff, false, 8, &[0, 0, 0]);
            }),
            Err(BtfError::TruncatedType { .. })
        ));
        // Unknown kinds.
        assert_eq!(
            one(&|b| {
                b.ty("x", 25, 0, false, 0, &[]);
            })
            .unwrap_err(),
            BtfError::UnknownKind { id: 1, kind: 25 }
        );
        assert_eq!(
            one(&|b| {
                b.ty("x", 0, 0, false, 0, &[]);
            })
            .unwrap_err(),
            BtfError::UnknownKind { id: 1, kind: 0 }
        );
        // Trailing garbage shorter than a record.
        assert!(matches!(
            one(&|b| {
                b.int("int", 4, true);
                b.types.extend_from_slice(&[1, 2, 3]);
            }),
            Err(BtfError::Truncated { .. })
        ));
        // An empty type section is valid: only void.
        assert_eq!(one(&|_| {}).unwrap().type_count(), 1);
    }

    #[test]
    fn malformed_semantics_are_errors_not_hangs() {
        // Typedef cycle.
        let mut b = B::new();
        let a = b.typedef("a", 2);
        b.typedef("b", 1);
        b.struct_("s", 4, &[("x", a, 0, 0)]);
        let self_array = b.peek();
        b.array(self_array, 0, 1);
        let c = b.peek();
        b.ty("", 10, 0, false, c, &[]); // const of itself
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.resolve(1), Err(BtfError::ResolveLoop(1)));
        assert_eq!(btf.type_size(2), Err(BtfError::ResolveLoop(2)));
        assert_eq!(
            btf.type_size(self_array),
            Err(BtfError::ResolveLoop(self_array))
        );
        assert_eq!(btf.resolve(c), Err(BtfError::ResolveLoop(c)));
        let e = btf.struct_layout("s").unwrap_err();
        assert!(
            matches!(&e, BtfError::InMember { structure, member, source } if structure == "s" && member == "x" && **source == BtfError::ResolveLoop(1)),
            "{e}"
        );
        assert!(e.to_string().starts_with("in s.x: "), "{e}");

        // Array sizes that overflow 64 bits.
        let mut b = B::new();
        let ulong = b.int("long unsigned int", 8, false);
        let inner = b.array(ulong, 0, u32::MAX);
        let outer = b.array(inner, 0, u32::MAX);
        b.struct_("huge", 8, &[("x", outer, 0, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.type_size(inner), Ok(8 * u64::from(u32::MAX)));
        assert_eq!(btf.type_size(outer), Err(BtfError::Overflow(outer)));
        assert!(matches!(
            btf.struct_layout("huge"),
            Err(BtfError::InMember { .. })
        ));

        // A struct that contains itself anonymously, and a member outside its struct.
        let mut b = B::new();
        let me = b.peek();
        b.struct_("loop", 4, &[("", me, 0, 0)]);
        let int = b.int("int", 4, true);
        b.struct_("outside", 4, &[("x", int, 64, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(
            btf.struct_layout("loop"),
            Err(BtfError::TooManyMembers("loop".into()))
        );
        assert!(matches!(
            btf.struct_layout("outside"),
            Err(BtfError::MemberOutside { .. })
        ));

        // Wide fan-out of anonymous members is cut by the member budget.
        let mut b = B::new();
        let int = b.int("int", 4, true);
        let leaf = b.struct_("", 4, &[("x", int, 0, 0)]);
        let mid = b.struct_("", 4, &vec![("", leaf, 0, 0); 300]);
        b.struct_("wide", 4, &vec![("", mid, 0, 0); 300]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(
            btf.struct_layout("wide"),
            Err(BtfError::TooManyMembers("wide".into()))
        );

        // Names that are not UTF-8.
        let mut b = B::new();
        b.int("int", 4, true);
        b.strs.truncate(1);
        b.strs.extend_from_slice(b"\xff\xfe\0");
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.name(1), Err(BtfError::NotUtf8(1)));
    }

    #[test]
    fn from_elf_finds_the_btf_section() {
        let blob = sample();
        let image =
            crate::elf::tests::build(&[(".text", 1, b"\xc3", 0, 0), (".BTF", 1, &blob, 0, 0)]);
        let btf = Btf::from_elf(&image).unwrap();
        assert_eq!(btf.struct_layout("task_struct").unwrap().size, 128);
        let image = crate::elf::tests::build(&[(".text", 1, b"\xc3", 0, 0)]);
        assert_eq!(Btf::from_elf(&image).unwrap_err(), BtfError::NoBtf);
        assert!(matches!(
            Btf::from_elf(b"MZ garbage"),
            Err(BtfError::Elf(ElfError::NotElf(_)))
        ));
    }

    // ---------------------------------------------------------------- robustness over mutations

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next() % n as u64) as usize
            }
        }
    }

    /// One random corruption of `blob`.
    fn mutate(rng: &mut Rng, blob: &[u8]) -> Vec<u8> {
        let mut g = blob.to_vec();
        for _ in 0..1 + rng.below(3) {
            match rng.below(6) {
                0 => {
                    let i = rng.below(g.len());
                    if let Some(b) = g.get_mut(i) {
                        *b ^= 1 << rng.below(8);
                    }
                }
                1 => {
                    let i = rng.below(g.len());
                    if let Some(b) = g.get_mut(i) {
                        *b = rng.next() as u8;
                    }
                }
                2 | 3 => {
                    // An interesting 32-bit value at an aligned spot (ids, offsets, vlen/kind).
                    let i = rng.below(g.len() / 4) * 4;
                    let v = [
                        0,
                        1,
                        2,
                        0xffff,
                        0x7fff_ffff,
                        u32::MAX,
                        rng.next() as u32,
                        rng.below(64) as u32,
                        0x0400_ffff,
                        0x8400_0002,
                    ];
                    if i + 4 <= g.len() {
                        put32(&mut g, i, v[rng.below(v.len())]);
                    }
                }
                4 => g.truncate(rng.below(g.len() + 1)),
                _ => {
                    // Shrink or grow a header length field so truncation happens inside a section.
                    if g.len() >= 24 {
                        let f = [12, 20][rng.below(2)];
                        let v = u32::from_le_bytes(g[f..f + 4].try_into().unwrap());
                        put32(
                            &mut g,
                            f,
                            v.wrapping_add(rng.below(64) as u32).wrapping_sub(32),
                        );
                    }
                }
            }
        }
        g
    }

    /// Asks every question of a (possibly corrupt) BTF; none may panic or hang.
    fn exercise(btf: &Btf) {
        for id in 0..btf.type_count() as TypeId {
            let _ = btf.resolve(id);
            let _ = btf.type_size(id);
            let _ = btf.name(id);
            let _ = btf.pointee(id);
            let _ = btf.int_info(id);
            let _ = btf.array_info(id);
            if matches!(btf.kind(id), Ok(Kind::Struct | Kind::Union)) {
                if let Ok(l) = btf.struct_layout_by_id(id) {
                    for m in &l.members {
                        let _ = l.offset(&m.name);
                    }
                }
            }
            if matches!(btf.kind(id), Ok(Kind::Enum | Kind::Enum64)) {
                let _ = btf.enumerator(id, "PIDTYPE_PID");
            }
        }
        let _ = btf.struct_layout("task_struct");
        let _ = btf.field_offset("task_struct", "tasks.prev");
        let _ = btf.field_offset("cred", "euid.val");
        let _ = btf.enum_value("pid_type", "PIDTYPE_MAX");
        let _ = btf.enum_constant("NR_MM_COUNTERS");
    }

    #[test]
    fn parse_is_total_over_mutated_samples() {
        let blob = sample();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut parsed = 0;
        for _ in 0..4000 {
            let g = mutate(&mut rng, &blob);
            if let Ok(btf) = Btf::parse(&g) {
                parsed += 1;
                exercise(&btf);
            }
        }
        eprintln!("mutated samples: {parsed}/4000 still parsed (and were exercised)");
        assert!(
            parsed > 100,
            "mutations should not all be rejected ({parsed})"
        );
    }

    /// Re-encodes the types reachable from `roots` (not following pointers, whose targets
    /// become void unless reached otherwise) as a small self-contained blob.
    fn extract(btf: &Btf, roots: &[TypeId]) -> Vec<u8> {
        let n = btf.types.len();
        let mut keep = vec![false; n];
        let mut stack = roots.to_vec();
        while let Some(id) = stack.pop() {
            if id == 0 || keep[id as usize] {
                continue;
            }
            keep[id as usize] = true;
            btf.visit_refs(id, |slot| {
                if let Slot::Type {
                    pos,
                    via_ptr: false,
                } = slot
                {
                    stack.push(btf.word(pos)?);
                }
                Ok(())
            })
            .unwrap();
        }
        let mut map = vec![0u32; n];
        let mut next = 1;
        for id in 1..n {
            if keep[id] {
                map[id] = next;
                next += 1;
            }
        }
        let mut strs = vec![0u8];
        let mut interned: HashMap<u32, u32> = HashMap::new();
        let mut types = Vec::new();
        for id in (1..n).filter(|&i| keep[i]) {
            let t = btf.types[id];
            let start = t.extra as usize - TYPE_HEADER_LEN;
            let end = t.extra as usize + t.kind.trailing(t.vlen);
            let mut chunk = btf.data[start..end].to_vec();
            btf.visit_refs(id as TypeId, |slot| {
                let (pos, new) = match slot {
                    Slot::Name(pos) => {
                        let old = btf.word(pos)?;
                        let new = *interned.entry(old).or_insert_with(|| {
                            if old == 0 {
                                return 0;
                            }
                            let off = strs.len() as u32;
                            strs.extend_from_slice(btf.str_bytes(old).unwrap());
                            strs.push(0);
                            off
                        });
                        (pos, new)
                    }
                    Slot::Type { pos, .. } => (pos, map[btf.word(pos)? as usize]),
                };
                put32(&mut chunk, pos as usize - start, new);
                Ok(())
            })
            .unwrap();
            types.extend_from_slice(&chunk);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[VERSION, 0]);
        for w in [
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strs.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strs);
        out
    }

    #[test]
    fn parse_is_total_over_mutated_real_btf() {
        let k = kernel(Which::Patched);
        let roots: Vec<TypeId> = [
            "task_struct",
            "mm_struct",
            "cred",
            "list_head",
            "signal_struct",
            "pid_type",
        ]
        .iter()
        .map(|n| k.btf.find(n).next().unwrap())
        .collect();
        let mini = extract(&k.btf, &roots);
        let btf = Btf::parse(&mini).unwrap();
        // The extract keeps the real layouts.
        assert_eq!(btf.struct_layout("task_struct").unwrap(), {
            let mut l = k.btf.struct_layout("task_struct").unwrap();
            l.type_id = btf.struct_layout("task_struct").unwrap().type_id;
            for (m, n) in l
                .members
                .iter_mut()
                .zip(btf.struct_layout("task_struct").unwrap().members)
            {
                m.type_id = n.type_id;
                m.kind = n.kind;
            }
            l
        });
        let start = Instant::now();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut parsed, rounds) = (0, 1500);
        for _ in 0..rounds {
            let g = mutate(&mut rng, &mini);
            if let Ok(btf) = Btf::parse(&g) {
                parsed += 1;
                exercise(&btf);
            }
        }
        // A few corruptions of the whole real blob too (each parse is a full one).
        let full = crate::elf::section(&k.image, ".BTF").unwrap();
        for _ in 0..4 {
            let g = mutate(&mut rng, full);
            if let Ok(btf) = Btf::parse(&g) {
                let _ = btf.struct_layout("task_struct");
            }
        }
        eprintln!(
            "real-derived blob ({} types, {} bytes): {parsed}/{rounds} mutants parsed and exercised in {:?}",
            btf.type_count(),
            mini.len(),
            start.elapsed()
        );
        assert!(
            parsed > 50,
            "mutations should not all be rejected ({parsed})"
        );
    }

    // ---------------------------------------------------------------- the real kernels

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Which {
        Patched,
        Stock,
    }

    struct Kernel {
        which: Which,
        path: PathBuf,
        image: Vec<u8>,
        btf: Btf,
        parse_time: Duration,
        /// The images.env this kernel was found through (it may be rewritten by a rebuild).
        env: HashMap<String, String>,
    }

    fn images_env() -> HashMap<String, String> {
        let path = std::env::var_os("BD_IMAGES_ENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME").unwrap_or_default();
                Path::new(&home).join(".cache/backdoors/images.env")
            });
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {} ({e}): the real-kernel BTF tests need the guest images; run images/build.sh (or point BD_IMAGES_ENV at its images.env)",
                path.display()
            )
        });
        text.lines()
            .filter_map(|l| l.trim().split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
            .collect()
    }

    fn kernel(which: Which) -> &'static Kernel {
        static PATCHED: OnceLock<Kernel> = OnceLock::new();
        static STOCK: OnceLock<Kernel> = OnceLock::new();
        let (cell, key) = match which {
            Which::Patched => (&PATCHED, "BD_KERNEL_VMLINUX"),
            Which::Stock => (&STOCK, "BD_STOCK_VMLINUX"),
        };
        cell.get_or_init(|| {
            let env = images_env();
            let path = PathBuf::from(env.get(key).unwrap_or_else(|| {
                panic!("images.env has no {key}; run images/build.sh to build the guest images")
            }));
            let image = std::fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "cannot read {key}={} ({e}); run images/build.sh to build the guest images",
                    path.display()
                )
            });
            let blob = crate::elf::section(&image, ".BTF").unwrap();
            let start = Instant::now();
            let btf = Btf::parse(blob).unwrap_or_else(|e| panic!("{key}={}: {e}", path.display()));
            let parse_time = start.elapsed();
            Kernel {
                which,
                path,
                image,
                btf,
                parse_time,
                env,
            }
        })
    }

    const BOTH: [Which; 2] = [Which::Patched, Which::Stock];

    #[test]
    fn real_btf_parses_timing_and_census() {
        for which in BOTH {
            let k = kernel(which);
            let mut census: HashMap<Kind, usize> = HashMap::new();
            for id in 0..k.btf.type_count() as TypeId {
                *census.entry(k.btf.kind(id).unwrap()).or_default() += 1;
            }
            let mut census: Vec<_> = census.into_iter().collect();
            census.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
            // Names defined by more than one complete struct (dedup leftovers).
            let mut names: HashMap<&str, usize> = HashMap::new();
            let (mut kflag_structs, mut signed_enums, mut legacy_bitfields) = (0, 0, 0);
            for id in 0..k.btf.type_count() as TypeId {
                let t = k.btf.types[id as usize];
                if matches!(t.kind, Kind::Struct | Kind::Union) && t.vlen > 0 {
                    *names.entry(k.btf.name(id).unwrap()).or_default() += 1;
                    kflag_structs += usize::from(t.kflag);
                }
                if matches!(t.kind, Kind::Enum | Kind::Enum64) {
                    signed_enums += usize::from(t.kflag);
                }
                if t.kind == Kind::Int {
                    let i = k.btf.int_info(id).unwrap();
                    legacy_bitfields +=
                        usize::from(i.offset != 0 || u32::from(i.bits) != i.size * 8);
                }
            }
            let mut dups: Vec<_> = names
                .into_iter()
                .filter(|&(n, c)| c > 1 && !n.is_empty())
                .collect();
            dups.sort();
            // Time a second parse too (the first may have run with a cold page cache).
            let blob = crate::elf::section(&k.image, ".BTF").unwrap();
            let start = Instant::now();
            let again = Btf::parse(blob).unwrap();
            let warm = start.elapsed();
            assert_eq!(again.type_count(), k.btf.type_count());
            eprintln!(
                "{:?} {}: .BTF {} bytes, {} types; parse {:?}, re-parse {:?} ({} build, tests running in parallel)\n  kinds: {:?}\n  complete structs sharing a name: {} {:?}\n  kind_flag (bitfield encoding) on {} structs/unions, {} signed enums, {} ints with legacy bitfield encoding",
                k.which,
                k.path.display(),
                blob.len(),
                k.btf.type_count(),
                k.parse_time,
                warm,
                if cfg!(debug_assertions) { "debug" } else { "release" },
                census,
                dups.len(),
                dups.iter().take(10).collect::<Vec<_>>(),
                kflag_structs,
                signed_enums,
                legacy_bitfields
            );
            assert!(k.btf.type_count() > 10_000);
        }
    }

    fn pointee_name(btf: &Btf, m: &Member) -> String {
        let target = btf.resolve(btf.pointee(m.type_id).unwrap()).unwrap();
        btf.name(target).unwrap().to_owned()
    }

    #[test]
    fn real_task_struct_members() {
        for which in BOTH {
            let btf = &kernel(which).btf;
            let t = btf.struct_layout("task_struct").unwrap();
            let m = |n: &str| t.member(n).unwrap_or_else(|e| panic!("{which:?}: {e}"));
            for n in ["pid", "tgid"] {
                assert_eq!(
                    (m(n).kind.clone(), m(n).size),
                    (MemberKind::Int { signed: true }, 4),
                    "{which:?} {n}"
                );
            }
            assert!(matches!(
                m("comm").kind,
                MemberKind::Array {
                    elem_size: 1,
                    len: 16,
                    ..
                }
            ));
            for (n, target) in [
                ("real_cred", "cred"),
                ("cred", "cred"),
                ("mm", "mm_struct"),
                ("real_parent", "task_struct"),
                ("group_leader", "task_struct"),
                ("signal", "signal_struct"),
            ] {
                assert_eq!(m(n).kind, MemberKind::Pointer, "{which:?} {n}");
                assert_eq!(pointee_name(btf, m(n)), target, "{which:?} {n}");
            }
            for n in [
                "tasks",
                "children",
                "sibling",
                "thread_group",
                "thread_node",
            ] {
                assert_eq!(
                    m(n).kind,
                    MemberKind::Struct("list_head".into()),
                    "{which:?} {n}"
                );
                assert_eq!(m(n).size, 16);
            }
            assert_eq!(
                (m("start_time").kind.clone(), m("start_time").size),
                (MemberKind::Int { signed: false }, 8)
            );
            assert_eq!(
                (m("flags").kind.clone(), m("flags").size),
                (MemberKind::Int { signed: false }, 4)
            );
            assert_eq!(
                (m("__state").kind.clone(), m("__state").size),
                (MemberKind::Int { signed: false }, 4)
            );
            assert_eq!(m("exit_state").kind, MemberKind::Int { signed: true });
            assert_eq!(m("pending").kind, MemberKind::Struct("sigpending".into()));
            assert!(!t.has("state"), "6.1 renamed state to __state");
            for n in [
                "pid",
                "tgid",
                "comm",
                "real_cred",
                "cred",
                "mm",
                "tasks",
                "children",
                "sibling",
                "real_parent",
                "group_leader",
                "thread_group",
                "start_time",
                "flags",
                "exit_state",
                "__state",
                "pending",
                "signal",
            ] {
                assert_eq!(
                    btf.field_offset("task_struct", n).unwrap(),
                    t.offset(n).unwrap()
                );
            }
            // signal_struct keeps the thread list head too.
            let sig = btf.struct_layout("signal_struct").unwrap();
            assert_eq!(
                sig.member("thread_head").unwrap().kind,
                MemberKind::Struct("list_head".into())
            );
            // list_head, cred.
            let lh = btf.struct_layout("list_head").unwrap();
            assert_eq!(
                (
                    lh.size,
                    lh.offset("next").unwrap(),
                    lh.offset("prev").unwrap()
                ),
                (16, 0, 8)
            );
            let cred = btf.struct_layout("cred").unwrap();
            for n in ["uid", "euid"] {
                let u = cred.member(n).unwrap();
                assert_eq!(
                    (u.kind.clone(), u.size),
                    (MemberKind::Struct(String::new()), 4),
                    "kuid_t is an anonymous struct"
                );
                assert_eq!(btf.name(u.type_id).unwrap(), "kuid_t");
                assert_eq!(
                    btf.field_offset("cred", &format!("{n}.val")).unwrap(),
                    cred.offset(n).unwrap()
                );
            }
            // mm_struct.rss_stat: struct mm_rss_stat { atomic_long_t count[NR_MM_COUNTERS]; },
            // inside mm_struct's anonymous struct.
            let mm = btf.struct_layout("mm_struct").unwrap();
            let rss = mm.member("rss_stat").unwrap();
            assert_eq!(rss.kind, MemberKind::Struct("mm_rss_stat".into()));
            let nr = btf.enum_constant("NR_MM_COUNTERS").unwrap();
            let count = btf.struct_layout("mm_rss_stat").unwrap();
            let count = count.member("count").unwrap();
            let MemberKind::Array {
                elem_type,
                elem_size,
                len,
            } = count.kind
            else {
                panic!("{which:?}: mm_rss_stat.count is {:?}", count.kind)
            };
            assert_eq!((elem_size, i128::from(len)), (8, nr));
            assert_eq!(btf.name(elem_type).unwrap(), "atomic_long_t");
            assert_eq!(
                btf.field_offset("mm_struct", "rss_stat.count").unwrap(),
                mm.offset("rss_stat").unwrap()
            );
            assert!(mm.has("pgd") && mm.has("mm_users"));
            // Enums.
            assert_eq!(btf.enum_value("pid_type", "PIDTYPE_PID").unwrap(), 0);
            assert_eq!(btf.enum_value("pid_type", "PIDTYPE_TGID").unwrap(), 1);
            assert_eq!(btf.enum_value("pid_type", "PIDTYPE_MAX").unwrap(), 4);
            assert_eq!(nr, 4);
            eprintln!(
                "{which:?}: task_struct {} bytes, {} members; pid@{} tgid@{} comm@{} tasks@{} mm@{} cred@{}; mm_struct.rss_stat@{}",
                t.size,
                t.members.len(),
                t.offset("pid").unwrap(),
                t.offset("tgid").unwrap(),
                t.offset("comm").unwrap(),
                t.offset("tasks").unwrap(),
                t.offset("mm").unwrap(),
                t.offset("cred").unwrap(),
                mm.offset("rss_stat").unwrap()
            );
        }
    }

    /// (bit offset, size, is bitfield) of a member as pahole prints it.
    type PaholePos = (u64, u64, bool);

    /// Member name → position, and the struct's size, as pahole prints them.
    fn pahole(vmlinux: &Path, structure: &str) -> (HashMap<String, PaholePos>, Option<u64>) {
        let out = std::process::Command::new("pahole")
            .arg("-C")
            .arg(structure)
            .arg(vmlinux)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run pahole ({e}); install Debian's dwarves package")
            });
        assert!(
            out.status.success(),
            "pahole failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            !text.trim().is_empty(),
            "pahole printed nothing for {structure}"
        );
        // pahole prints anonymous struct/union types inline: their members appear (with absolute
        // offsets) in a `struct {`...`} name;` block. A block closed without a name is an
        // anonymous member, flattened like ours; a named one is a single member.
        type Entry = (String, PaholePos);
        let mut blocks: Vec<Vec<Entry>> = Vec::new();
        let mut members: Option<Vec<Entry>> = None;
        let mut size = None;
        for line in text.lines() {
            let (decl, comment) = match line.find("/*") {
                Some(c) => (
                    line[..c].trim(),
                    line[c + 2..].trim_end().trim_end_matches("*/"),
                ),
                None => (line.trim(), ""),
            };
            if let Some(rest) = comment.trim().strip_prefix("size: ") {
                size = rest.split(',').next().and_then(|s| s.trim().parse().ok());
                continue;
            }
            if decl.ends_with('{') {
                blocks.push(Vec::new());
                continue;
            }
            // "offset size", or "byte:bit size" for bitfields (the bit may abut the colon).
            let spaced = comment.replacen(':', ": ", 1);
            let toks: Vec<&str> = spaced.split_whitespace().collect();
            let num = |t: &str| t.trim_end_matches(':').parse::<u64>().ok();
            let pos = match toks.as_slice() {
                [byte, bit, sz] if byte.ends_with(':') => match (num(byte), num(bit), num(sz)) {
                    (Some(byte), Some(bit), Some(sz)) => Some((byte * 8 + bit, sz, true)),
                    _ => None,
                },
                [byte, sz] => match (num(byte), num(sz)) {
                    (Some(byte), Some(sz)) => Some((byte * 8, sz, false)),
                    _ => None,
                },
                _ => None,
            };
            if let Some(close) = decl.strip_prefix('}') {
                let inner = blocks.pop().expect("unbalanced pahole output");
                let name = close.trim().trim_end_matches(';').trim();
                match blocks.last_mut() {
                    None => members = Some(inner),
                    Some(parent) if name.is_empty() => parent.extend(inner),
                    Some(parent) => {
                        parent.push((name.to_owned(), pos.expect("named block has an offset")))
                    }
                }
                continue;
            }
            let (Some(decl), Some(pos)) = (decl.strip_suffix(';'), pos) else {
                continue;
            };
            let name = if let Some(p) = decl.find("(*") {
                decl[p + 2..].split(')').next().unwrap_or("")
            } else {
                let d = decl.split(" __attribute__").next().unwrap_or(decl);
                let d = d.split(':').next().unwrap_or(d);
                let d = d.split('[').next().unwrap_or(d);
                d.rsplit([' ', '\t', '*']).next().unwrap_or("")
            };
            assert!(!name.is_empty(), "cannot parse pahole line {line:?}");
            blocks
                .last_mut()
                .expect("member outside a struct")
                .push((name.to_owned(), pos));
        }
        let mut map = HashMap::new();
        for (name, pos) in members.expect("pahole output has no closing brace") {
            assert!(
                map.insert(name.clone(), pos).is_none(),
                "{name} twice in pahole output"
            );
        }
        (map, size)
    }

    #[test]
    fn real_layouts_match_pahole() {
        let key_fields = [
            "pid",
            "tgid",
            "comm",
            "real_cred",
            "cred",
            "mm",
            "tasks",
            "children",
            "sibling",
            "real_parent",
            "group_leader",
            "thread_group",
            "thread_node",
            "start_time",
            "flags",
            "exit_state",
            "__state",
            "pending",
            "signal",
        ];
        for which in BOTH {
            let k = kernel(which);
            let mut total = 0;
            for structure in [
                "task_struct",
                "mm_struct",
                "cred",
                "list_head",
                "signal_struct",
                "sigpending",
                "mm_rss_stat",
                "pid",
                "upid",
            ] {
                let ours = k.btf.struct_layout(structure).unwrap();
                let (theirs, size) = pahole(&k.path, structure);
                assert_eq!(
                    Some(ours.size),
                    size,
                    "{which:?} sizeof(struct {structure})"
                );
                for (name, &(bits, sz, bitfield)) in &theirs {
                    let m = ours
                        .member(name)
                        .unwrap_or_else(|e| panic!("{which:?}: pahole has it but {e}"));
                    assert_eq!(
                        m.offset_bits, bits,
                        "{which:?} {structure}.{name} offset (bits)"
                    );
                    assert_eq!(m.size, sz, "{which:?} {structure}.{name} size");
                    assert_eq!(
                        m.bitfield_bits != 0,
                        bitfield,
                        "{which:?} {structure}.{name} bitfield"
                    );
                }
                let extra: Vec<&str> = ours
                    .members
                    .iter()
                    .map(|m| m.name.as_str())
                    .filter(|n| !theirs.contains_key(*n))
                    .collect();
                assert_eq!(
                    ours.members.len(),
                    theirs.len(),
                    "{which:?} {structure}: member count vs pahole; only ours: {extra:?}"
                );
                if structure == "task_struct" {
                    for f in key_fields {
                        assert!(
                            theirs.contains_key(f),
                            "{which:?}: pahole shows no task_struct.{f}"
                        );
                    }
                    assert!(
                        theirs.values().any(|v| v.2),
                        "task_struct has bitfields to compare"
                    );
                }
                total += theirs.len();
            }
            eprintln!(
                "{which:?}: {total} members of 9 structs match pahole (offset, size, bitfield)"
            );
        }
    }

    #[test]
    fn real_elf_symbols_and_sections() {
        let patched = kernel(Which::Patched);
        let addr = crate::elf::symbol(&patched.image, "init_task")
            .unwrap()
            .expect("init_task in .symtab");
        let map = std::fs::read_to_string(&patched.env["BD_KERNEL_SYSTEM_MAP"]).unwrap();
        let from_map = map
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                let (a, _, n) = (f.next()?, f.next()?, f.next()?);
                (n == "init_task").then(|| u64::from_str_radix(a, 16).ok())?
            })
            .unwrap();
        assert_eq!(addr, from_map);
        assert_eq!(
            crate::elf::symbol(&patched.image, "no_such_symbol_here").unwrap(),
            None
        );
        let stock = kernel(Which::Stock);
        assert_eq!(
            crate::elf::symbol(&stock.image, "init_task"),
            Err(ElfError::NoSymtab)
        );
        assert!(crate::elf::section(&stock.image, ".BTF").is_ok());
        // The vmlinuz (bzImage) is not an ELF file.
        let vmlinuz = std::fs::read(&stock.env["BD_STOCK_VMLINUZ"]).unwrap();
        assert!(matches!(
            Btf::from_elf(&vmlinuz),
            Err(BtfError::Elf(ElfError::NotElf(_)))
        ));
    }
}
