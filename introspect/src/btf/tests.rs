//! Unit tests of the BTF reader over hand-built blobs, well-formed and malformed.

#![allow(
    // Test fixtures: small, fixed values built by the test itself.
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]
use super::encoder::*;
use super::*;

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
    let image = crate::elf::tests::build(&[(".text", 1, b"\xc3", 0, 0), (".BTF", 1, &blob, 0, 0)]);
    let btf = Btf::from_elf(&image).unwrap();
    assert_eq!(btf.struct_layout("task_struct").unwrap().size, 128);
    let image = crate::elf::tests::build(&[(".text", 1, b"\xc3", 0, 0)]);
    assert_eq!(Btf::from_elf(&image).unwrap_err(), BtfError::NoBtf);
    assert!(matches!(
        Btf::from_elf(b"MZ garbage"),
        Err(BtfError::Elf(ElfError::NotElf(_)))
    ));
}
