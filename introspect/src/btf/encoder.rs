//! A small BTF encoder for tests: builds blobs type by type.

#![allow(
    // Test fixtures: small, fixed values built by the test itself.
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]
use super::*;

/// Builds BTF blobs type by type; ids are handed out in order from 1.
pub(crate) struct B {
    pub(crate) types: Vec<u8>,
    pub(crate) strs: Vec<u8>,
    next: u32,
}

impl B {
    pub(crate) fn new() -> B {
        B {
            types: Vec::new(),
            strs: vec![0],
            next: 1,
        }
    }

    pub(crate) fn s(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        let off = self.strs.len() as u32;
        self.strs.extend_from_slice(s.as_bytes());
        self.strs.push(0);
        off
    }

    /// The id the next type will get.
    pub(crate) fn peek(&self) -> u32 {
        self.next
    }

    pub(crate) fn raw(&mut self, name_off: u32, info: u32, st: u32, extra: &[u32]) -> u32 {
        for w in [name_off, info, st].iter().chain(extra) {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
        self.next += 1;
        self.next - 1
    }

    pub(crate) fn ty(
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

    pub(crate) fn int(&mut self, name: &str, size: u32, signed: bool) -> u32 {
        self.ty(
            name,
            1,
            0,
            false,
            size,
            &[(u32::from(signed) << 24) | (size * 8)],
        )
    }

    pub(crate) fn int_bits(&mut self, name: &str, size: u32, bits: u32) -> u32 {
        self.ty(name, 1, 0, false, size, &[bits])
    }

    pub(crate) fn ptr(&mut self, t: u32) -> u32 {
        self.ty("", 2, 0, false, t, &[])
    }

    pub(crate) fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
        self.ty("", 3, 0, false, 0, &[elem, index, n])
    }

    /// Members are (name, type, bit offset, bitfield bits).
    pub(crate) fn aggregate(
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

    pub(crate) fn struct_(
        &mut self,
        name: &str,
        size: u32,
        members: &[(&str, u32, u32, u32)],
    ) -> u32 {
        self.aggregate(4, name, size, members)
    }

    pub(crate) fn union_(
        &mut self,
        name: &str,
        size: u32,
        members: &[(&str, u32, u32, u32)],
    ) -> u32 {
        self.aggregate(5, name, size, members)
    }

    pub(crate) fn enum_(&mut self, name: &str, signed: bool, vals: &[(&str, i32)]) -> u32 {
        let mut words = Vec::new();
        for &(n, v) in vals {
            words.push(self.s(n));
            words.push(v as u32);
        }
        self.ty(name, 6, vals.len() as u32, signed, 4, &words)
    }

    pub(crate) fn enum64(&mut self, name: &str, signed: bool, vals: &[(&str, u64)]) -> u32 {
        let mut words = Vec::new();
        for &(n, v) in vals {
            words.push(self.s(n));
            words.push(v as u32);
            words.push((v >> 32) as u32);
        }
        self.ty(name, 19, vals.len() as u32, signed, 8, &words)
    }

    pub(crate) fn fwd(&mut self, name: &str, union: bool) -> u32 {
        self.ty(name, 7, 0, union, 0, &[])
    }

    pub(crate) fn typedef(&mut self, name: &str, t: u32) -> u32 {
        self.ty(name, 8, 0, false, t, &[])
    }

    pub(crate) fn func_proto(&mut self, ret: u32, params: &[(&str, u32)]) -> u32 {
        let mut words = Vec::new();
        for &(n, t) in params {
            words.push(self.s(n));
            words.push(t);
        }
        self.ty("", 13, params.len() as u32, false, ret, &words)
    }

    pub(crate) fn datasec(&mut self, name: &str, size: u32, vars: &[(u32, u32, u32)]) -> u32 {
        let words: Vec<u32> = vars.iter().flat_map(|&(t, o, s)| [t, o, s]).collect();
        self.ty(name, 15, vars.len() as u32, false, size, &words)
    }

    pub(crate) fn build(&self) -> Vec<u8> {
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

pub(crate) fn put32(blob: &mut [u8], off: usize, v: u32) {
    blob[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// A blob with every kind, bitfields, anonymous members, duplicates and enums.
pub(crate) fn sample() -> Vec<u8> {
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
