//! Struct layouts (anonymous members flattened), field offsets and enum values.

use super::*;

impl Btf {
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
                            i128::from(i32::from_le_bytes(raw.to_le_bytes()))
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
                            i128::from(i64::from_le_bytes(raw.to_le_bytes()))
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
            if let Some(v) = self.enumerator(u32_sat(id), constant)? {
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
