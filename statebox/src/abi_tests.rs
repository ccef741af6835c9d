use super::*;

/// The pinned test vectors (c/test.c pins the same numbers).
#[test]
fn check_test_vectors() {
    assert_eq!(check(1, 1, b""), 0x4307_45c1_c6fa_3d5a);
    assert_eq!(
        check(0x1122_3344_5566_7788, 7, b"hello, state box"),
        0xed76_f211_762f_b694
    );
    // A partial last word is zero-padded, and len is mixed in: "abc" != "abc\0".
    assert_eq!(check(5, 9, b"abc"), 0x2e28_4657_57ed_8cc1);
    assert_ne!(check(5, 9, b"abc"), check(5, 9, b"abc\0"));
}

fn header() -> Header {
    let mut h = Header::new(4, 100 * 8).unwrap();
    h.region_generation = 0xfeed;
    h.next_generation = 3;
    h
}

#[test]
fn header_geometry() {
    let h = Header::new(3, 8).unwrap();
    assert_eq!(h.copy_size(), 64);
    assert_eq!(h.slot_size, 64 + 128);
    assert_eq!(h.region_bytes(), 8192);
    assert_eq!(h.used_bytes(), 4096 + 3 * 192);
    assert_eq!(h.slot_offset(0), Some(4096));
    assert_eq!(h.slot_offset(2), Some(4096 + 2 * 192));
    assert_eq!(h.slot_offset(3), None);
    assert_eq!(h.copy_offset(0), 64);
    assert_eq!(h.copy_offset(1), 128);
    let h = Header::new(1, 1 << 20).unwrap();
    assert_eq!(h.copy_size(), (1 << 20) + 64);
    assert!(Header::new(MAX_SLOTS, 928).is_ok());
    assert!(Header::new(MAX_SLOTS, 1024).is_err());
}

#[test]
fn header_new_refuses_bad_geometry() {
    for (slots, cap) in [
        (0, 8),
        (MAX_SLOTS + 1, 8),
        (1, 0),
        (1, 4),
        (1, 12),
        (1, MAX_CAPACITY + 8),
        (1, u32::MAX - 7),
        (4, MAX_CAPACITY), // 4 slots of 2 MiB each: more than 8 MiB
    ] {
        assert!(
            matches!(Header::new(slots, cap), Err(AbiError::BadGeometry(_))),
            "{slots} x {cap}"
        );
    }
}

#[test]
fn header_round_trip() {
    let h = header();
    let mut page = vec![0u8; 4096];
    page[..64].copy_from_slice(&h.encode());
    assert_eq!(Header::parse(&page), Ok(h));
    assert_eq!(&page[..8], b"BDSTBOX1");
}

#[test]
fn header_parse_refusals() {
    let good = header().encode();
    assert_eq!(
        Header::parse(&good[..63]),
        Err(AbiError::Short { need: 64, have: 63 })
    );

    let mut b = good;
    b[0] ^= 1;
    assert!(matches!(Header::parse(&b), Err(AbiError::BadMagic { .. })));

    let mut b = good;
    b[8] = 2;
    assert_eq!(Header::parse(&b), Err(AbiError::BadVersion { found: 2 }));

    let mut b = good;
    b[0x0c..0x10].copy_from_slice(&8192u32.to_le_bytes());
    assert!(matches!(Header::parse(&b), Err(AbiError::BadGeometry(_))));

    let mut b = good;
    b[0x10..0x14].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(Header::parse(&b), Err(AbiError::BadGeometry(_))));

    let mut b = good;
    b[0x10..0x14].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(Header::parse(&b), Err(AbiError::BadGeometry(_))));

    let mut b = good;
    b[0x14..0x18].copy_from_slice(&(header().slot_size + 64).to_le_bytes());
    assert!(matches!(Header::parse(&b), Err(AbiError::BadGeometry(_))));

    let mut b = good;
    b[0x18..0x1c].copy_from_slice(&801u32.to_le_bytes());
    assert!(matches!(Header::parse(&b), Err(AbiError::BadGeometry(_))));

    // Consistent sizes but more than 8 MiB.
    let big = Header::new(1, 1 << 20).unwrap();
    let mut b = good;
    b[0x10..0x14].copy_from_slice(&4u32.to_le_bytes());
    b[0x14..0x18].copy_from_slice(&big.slot_size.to_le_bytes());
    b[0x18..0x1c].copy_from_slice(&big.capacity.to_le_bytes());
    assert!(matches!(Header::parse(&b), Err(AbiError::BadGeometry(_))));

    let mut b = good;
    b[0x20..0x28].fill(0);
    assert_eq!(Header::parse(&b), Err(AbiError::NoRegionGeneration));
}

/// A slot with `seq`, copy `copy` holding `bytes` (the other copy zero).
fn slot_with(h: &Header, seq: u64, copy: u32, bytes: &[u8]) -> Vec<u8> {
    let mut s = vec![0u8; usize::try_from(h.slot_size).unwrap()];
    s[..8].copy_from_slice(&seq.to_le_bytes());
    let off = usize::try_from(h.copy_offset(copy)).unwrap();
    s[off..off + bytes.len()].copy_from_slice(bytes);
    s
}

#[test]
fn slot_round_trip_and_active_copy() {
    let h = header();
    let c = encode_copy(&h, 77, 5, b"session state").unwrap();
    assert_eq!(c.len(), usize::try_from(h.copy_size()).unwrap());
    // seq 2: copy 1 is active.
    let s = slot_with(&h, 2, 1, &c);
    assert_eq!(slot_seq(&s), Some(2));
    let b = parse_slot(&h, 3, &s).unwrap().unwrap();
    assert_eq!(
        b,
        BoxCopy {
            slot: 3,
            seq: 2,
            id: 77,
            generation: 5,
            data: b"session state".to_vec()
        }
    );
    // seq 4: copy 0 (zero) is active: a free slot.
    let s = slot_with(&h, 4, 1, &c);
    assert_eq!(parse_slot(&h, 3, &s), Ok(None));
    // A never-used slot (all zero) is free.
    let s = slot_with(&h, 0, 0, &[]);
    assert_eq!(parse_slot(&h, 0, &s), Ok(None));
    // A deleted box: {0, 0, len 0}.
    let s = slot_with(&h, 6, 1, &encode_copy(&h, 0, 0, b"").unwrap());
    assert_eq!(parse_slot(&h, 0, &s), Ok(None));
}

#[test]
fn slot_refusals() {
    let h = header();
    let c = encode_copy(&h, 77, 5, b"0123456789").unwrap();

    let s = slot_with(&h, 2, 1, &c);
    assert_eq!(
        parse_slot(&h, 0, &s[..s.len() - 1]),
        Err(AbiError::Short {
            need: u64::from(h.slot_size),
            have: s.len() as u64 - 1
        })
    );
    assert_eq!(slot_seq(&s[..7]), None);
    assert_eq!(
        parse_slot(&h, 4, &s),
        Err(AbiError::NoSuchSlot {
            slot: 4,
            slot_count: 4
        })
    );

    let s = slot_with(&h, 3, 1, &c);
    assert_eq!(
        parse_slot(&h, 1, &s),
        Err(AbiError::OddSeq { slot: 1, seq: 3 })
    );

    let mut bad = c.clone();
    bad[0x10..0x14].copy_from_slice(&(h.capacity + 1).to_le_bytes());
    let s = slot_with(&h, 0, 0, &bad);
    assert_eq!(
        parse_slot(&h, 2, &s),
        Err(AbiError::LenTooLarge {
            slot: 2,
            len: h.capacity + 1,
            capacity: h.capacity
        })
    );

    let mut bad = c.clone();
    bad[0x08..0x10].fill(0);
    let s = slot_with(&h, 0, 0, &bad);
    assert_eq!(
        parse_slot(&h, 2, &s),
        Err(AbiError::NoGeneration { slot: 2, id: 77 })
    );

    let mut bad = c.clone();
    bad[40] ^= 0x10; // a data byte
    let s = slot_with(&h, 0, 0, &bad);
    assert_eq!(
        parse_slot(&h, 2, &s),
        Err(AbiError::BadCheck { slot: 2, id: 77 })
    );

    let mut bad = c.clone();
    bad[0x10] = 9; // len shorter than written: the check covers len
    let s = slot_with(&h, 0, 0, &bad);
    assert_eq!(
        parse_slot(&h, 2, &s),
        Err(AbiError::BadCheck { slot: 2, id: 77 })
    );

    // An inconsistent header handed in by a caller is refused, not trusted.
    let mut wrong = h;
    wrong.slot_size = 64;
    assert!(matches!(
        parse_slot(&wrong, 0, &s),
        Err(AbiError::BadGeometry(_))
    ));
}

#[test]
fn write_copy_refuses_too_much() {
    let h = header();
    let data = vec![1u8; usize::try_from(h.capacity).unwrap() + 1];
    assert_eq!(
        encode_copy(&h, 1, 1, &data),
        Err(AbiError::DataTooLarge {
            len: data.len(),
            capacity: h.capacity
        })
    );
    let mut small = [0u8; 40];
    assert_eq!(
        write_copy(&mut small, h.capacity, 1, 1, b"0123456789"),
        Err(AbiError::Short { need: 42, have: 40 })
    );
    // Nothing written when refused.
    assert_eq!(small, [0u8; 40]);
}

#[test]
fn region_snapshot_reports_bad_slots_and_reads_the_rest() {
    let h = Header::new(3, 64).unwrap();
    let mut h = h;
    h.region_generation = 9;
    let mut r = vec![0u8; usize::try_from(h.region_bytes()).unwrap()];
    r[..64].copy_from_slice(&h.encode());
    let put = |r: &mut Vec<u8>, slot: u32, seq: u64, copy: Vec<u8>| {
        let s = slot_with(&h, seq, abi_active(seq), &copy);
        let off = usize::try_from(h.slot_offset(slot).unwrap()).unwrap();
        r[off..off + s.len()].copy_from_slice(&s);
    };
    fn abi_active(seq: u64) -> u32 {
        active_copy(seq)
    }
    put(&mut r, 0, 2, encode_copy(&h, 10, 1, b"a").unwrap());
    let mut torn = encode_copy(&h, 11, 2, b"b").unwrap();
    torn[32] = b'c';
    put(&mut r, 1, 4, torn);
    put(&mut r, 2, 6, encode_copy(&h, 12, 3, b"c").unwrap());
    let snap = parse_region(&r).unwrap();
    assert_eq!(snap.header, h);
    assert_eq!(
        snap.boxes.iter().map(|b| b.id).collect::<Vec<_>>(),
        vec![10, 12]
    );
    assert_eq!(snap.bad, vec![(1, AbiError::BadCheck { slot: 1, id: 11 })]);

    let used = usize::try_from(h.used_bytes()).unwrap();
    assert!(parse_region(&r[..used]).is_ok());
    assert_eq!(
        parse_region(&r[..used - 1]),
        Err(AbiError::Short {
            need: h.used_bytes(),
            have: h.used_bytes() - 1
        })
    );
}

/// xorshift64*: deterministic pseudo-random bytes for the no-panic tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next().to_le_bytes()[0]).collect()
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let h = header();
    let slot_size = usize::try_from(h.slot_size).unwrap();
    for i in 0..10_000 {
        let n = usize::try_from(rng.next() % (u64::try_from(slot_size).unwrap() + 64)).unwrap();
        let mut b = rng.bytes(n);
        let _ = Header::parse(&b);
        let _ = parse_slot(&h, 0, &b);
        let _ = slot_seq(&b);
        let _ = parse_region(&b);
        // Half the time, a valid header with random slots, and a slot whose copy header is
        // plausible, so the parsers get past the first checks.
        if i % 2 == 0 && b.len() >= 64 {
            b[..64].copy_from_slice(&h.encode());
            let _ = parse_region(&b);
            if b.len() >= slot_size {
                b[..8].copy_from_slice(&(rng.next() & !1 & 0xff).to_le_bytes());
                let off =
                    usize::try_from(h.copy_offset(active_copy(slot_seq(&b).unwrap()))).unwrap();
                b[off + 0x10..off + 0x14]
                    .copy_from_slice(&u32::try_from(rng.next() % 900).unwrap().to_le_bytes());
                let _ = parse_slot(&h, 1, &b);
            }
        }
        // Random headers whose sizes are random but small numbers.
        let mut hb = h.encode();
        hb[0x10..0x14].copy_from_slice(&u32::try_from(rng.next() % 5000).unwrap().to_le_bytes());
        hb[0x14..0x18].copy_from_slice(&u32::try_from(rng.next() % 5000).unwrap().to_le_bytes());
        hb[0x18..0x1c].copy_from_slice(&u32::try_from(rng.next() % 5000).unwrap().to_le_bytes());
        let _ = Header::parse(&hb);
        // Random Header values handed to parse_slot directly.
        let any = Header {
            slot_count: u32::try_from(rng.next() >> 32).unwrap(),
            slot_size: u32::try_from(rng.next() >> 32).unwrap(),
            capacity: u32::try_from(rng.next() >> 32).unwrap(),
            region_generation: rng.next(),
            next_generation: rng.next(),
        };
        let _ = parse_slot(&any, 0, &b);
        let _ = any.region_bytes();
        let _ = any.copy_size();
        let _ = any.slot_offset(u32::try_from(rng.next() >> 32).unwrap());
        let _ = any.slot_bytes(&b, 1);
    }
}
