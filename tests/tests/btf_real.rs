//! The BTF reader on the real guest kernels (the patched 6.1 build and Debian's stock cloud
//! kernel): every type parses, the layouts the monitor relies on are found, and they match what
//! pahole prints from the same vmlinux. Needs the guest images (`images/build.sh`); moved out of
//! `cargo test -p introspect` so the crate's own tests need nothing built.

#![allow(
    // Test fixtures: small, fixed values built by the test itself.
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use introspect::btf::{Btf, BtfError, Kind, Member, MemberKind, TypeId};
use introspect::elf::ElfError;

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
        let blob = introspect::elf::section(&image, ".BTF").unwrap();
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
            let kind = k.btf.kind(id).unwrap();
            let (vlen, kflag) = k.btf.counts(id).unwrap();
            if matches!(kind, Kind::Struct | Kind::Union) && vlen > 0 {
                *names.entry(k.btf.name(id).unwrap()).or_default() += 1;
                kflag_structs += usize::from(kflag);
            }
            if matches!(kind, Kind::Enum | Kind::Enum64) {
                signed_enums += usize::from(kflag);
            }
            if kind == Kind::Int {
                let i = k.btf.int_info(id).unwrap();
                legacy_bitfields += usize::from(i.offset != 0 || u32::from(i.bits) != i.size * 8);
            }
        }
        let mut dups: Vec<_> = names
            .into_iter()
            .filter(|&(n, c)| c > 1 && !n.is_empty())
            .collect();
        dups.sort();
        // Time a second parse too (the first may have run with a cold page cache).
        let blob = introspect::elf::section(&k.image, ".BTF").unwrap();
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
fn real_task_layouts_resolve_every_field() {
    for which in BOTH {
        let btf = &kernel(which).btf;
        let l = introspect::tasks::TaskLayout::from_btf(btf)
            .unwrap_or_else(|e| panic!("{which:?}: {e}"));
        let missing: Vec<String> = l.unresolved().iter().map(ToString::to_string).collect();
        assert!(missing.is_empty(), "{which:?}: {missing:#?}");
        assert!(l.has_rss() && l.has_threads(), "{which:?}");
        introspect::repair::DirectLayout::from_btf(btf)
            .unwrap_or_else(|e| panic!("{which:?}: {e}"));
    }
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
        .unwrap_or_else(|e| panic!("cannot run pahole ({e}); install Debian's dwarves package"));
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
        eprintln!("{which:?}: {total} members of 9 structs match pahole (offset, size, bitfield)");
    }
}

#[test]
fn real_elf_symbols_and_sections() {
    let patched = kernel(Which::Patched);
    let addr = introspect::elf::symbol(&patched.image, "init_task")
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
        introspect::elf::symbol(&patched.image, "no_such_symbol_here").unwrap(),
        None
    );
    let stock = kernel(Which::Stock);
    assert_eq!(
        introspect::elf::symbol(&stock.image, "init_task"),
        Err(ElfError::NoSymtab)
    );
    assert!(introspect::elf::section(&stock.image, ".BTF").is_ok());
    // The vmlinuz (bzImage) is not an ELF file.
    let vmlinuz = std::fs::read(&stock.env["BD_STOCK_VMLINUZ"]).unwrap();
    assert!(matches!(
        Btf::from_elf(&vmlinuz),
        Err(BtfError::Elf(ElfError::NotElf(_)))
    ));
}
