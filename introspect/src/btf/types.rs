//! The public shapes of what BTF describes: kinds, integer and array encodings, struct layouts.

use std::fmt;

use super::{BtfError, TypeId};

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
    pub(super) fn from_raw(k: u32) -> Option<Kind> {
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
    pub(super) fn trailing(self, vlen: u16) -> usize {
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
    pub(super) fn is_alias(self) -> bool {
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
