//! Unit tests of the wire format: round trips, streaming, and every malformed input.

#![allow(
    // Test fixtures: small, fixed values built by the test itself.
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]
use super::payload::put_range;
use super::*;

/// A small deterministic PRNG (xorshift64*), so the random tests need no dependency.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn regs() -> Regs {
    Regs {
        rip: 0xffff_ffff_8100_0000,
        rsp: 0xffff_c900_0000_3f00,
        rflags: 0x246,
        cr0: 0x8005_0033,
        cr2: 0x7f00_dead_b000,
        cr3: 0x260_a000,
        cr4: 0x3606f0,
        efer: 0xd01,
        fs_base: 0x7f12_3456_7000,
        gs_base: 0xffff_8880_7fc0_0000,
        kernel_gs_base: Some(0x20),
        cpl: 0,
    }
}

/// One frame of every variant (and a few edge cases).
fn samples() -> Vec<Frame> {
    let mut batch_parts = vec![vec![1u8, 2, 3], Vec::new()];
    batch_parts.push((0..=255u8).collect());
    vec![
        Frame::request(
            1,
            Request::Hello {
                monitor_id: "monitor-a".into(),
                nonce: 0x0123_4567_89ab_cdef,
            },
        ),
        Frame::request(
            2,
            Request::Hello {
                monitor_id: "é".repeat(32),
                nonce: 0,
            },
        ),
        Frame::request(3, Request::FetchSb),
        Frame::request(
            4,
            Request::Read(Range {
                gpa: 0x10_0000,
                len: 4096,
            }),
        ),
        Frame::request(5, Request::ReadBatch(Vec::new())),
        Frame::request(
            6,
            Request::ReadBatch(
                (0..256)
                    .map(|i| Range {
                        gpa: i * 0x1000,
                        len: 64,
                    })
                    .collect(),
            ),
        ),
        Frame::request(
            7,
            Request::Write {
                gpa: 0xf0_0000,
                bytes: vec![9, 8, 7],
            },
        ),
        Frame::request(
            8,
            Request::Write {
                gpa: u64::MAX,
                bytes: Vec::new(),
            },
        ),
        Frame::request(9, Request::Lock { lease_ms: 500 }),
        Frame::request(10, Request::Unlock),
        Frame::request(11, Request::Regs { vcpu: 3 }),
        Frame::request(12, Request::Status),
        Frame::request(14, Request::Restart),
        Frame::request(13, Request::RdmaConnect(vec![1, 2, 3])),
        Frame::reply(
            1,
            Reply::Hello {
                nonce: 42,
                backdoor_gpa: 0xf0_0000,
                backdoor_size: 1 << 20,
            },
        ),
        Frame::reply(3, Reply::SensorBox(vec![0xab; 1000])),
        Frame::reply(4, Reply::Read(vec![0x5a; 4096])),
        Frame::reply(4, Reply::Read(Vec::new())),
        Frame::reply(6, Reply::ReadBatch(batch_parts)),
        Frame::reply(6, Reply::ReadBatch(Vec::new())),
        Frame::reply(7, Reply::Write),
        Frame::reply(9, Reply::Lock { lock_ns: 123_456 }),
        Frame::reply(10, Reply::Unlock),
        Frame::reply(11, Reply::Regs(regs())),
        Frame::reply(
            12,
            Reply::Status(VmStatus {
                state: VM_PAUSED,
                vcpus: 2,
                uptime_ms: 5,
                pauses: 9,
            }),
        ),
        Frame::reply(13, Reply::RdmaConnect(vec![9; MAX_RDMA_BLOB])),
        Frame::reply(14, Reply::Restart),
        Frame::reply(
            11,
            Reply::Regs(Regs {
                kernel_gs_base: None,
                cpl: 3,
                ..regs()
            }),
        ),
        Frame::reply(
            u64::MAX,
            Reply::Error {
                code: code::DENIED,
                message: "write outside the granted ranges".into(),
            },
        ),
        Frame::reply(
            0,
            Reply::Error {
                code: 0xffff,
                message: "x".repeat(MAX_ERROR_MESSAGE),
            },
        ),
    ]
}

/// A raw frame with a chosen header.
fn raw(version: u8, op: u8, flags: u16, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        version,
        op,
        flags,
        request_id: 77,
        payload_len: payload.len() as u32,
    };
    let mut v = h.to_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

fn req(op: Op, payload: &[u8]) -> Vec<u8> {
    raw(VERSION, op as u8, 0, payload)
}

#[test]
fn round_trip_every_variant() {
    for f in samples() {
        let bytes = encode(&f).unwrap();
        assert_eq!(
            bytes.len(),
            HEADER_LEN + u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize
        );
        assert_eq!(decode(&bytes).unwrap(), f, "{f:?}");
    }
}

#[test]
fn every_op_is_sampled() {
    let mut ops: Vec<u8> = samples().iter().map(|f| f.op() as u8).collect();
    ops.sort_unstable();
    ops.dedup();
    let all: Vec<u8> = (0..=255u8).filter(|b| Op::from_u8(*b).is_some()).collect();
    assert_eq!(ops, all);
    for op in all {
        assert_eq!(Op::from_u8(op).unwrap() as u8, op);
    }
}

#[test]
fn header_layout_is_as_documented() {
    let f = Frame::request(
        0x1122_3344_5566_7788,
        Request::Read(Range {
            gpa: 0xaabb,
            len: 0x10,
        }),
    );
    let b = encode(&f).unwrap();
    let mut want = b"BDBR".to_vec();
    want.extend_from_slice(&[1, 0x03, 0, 0]);
    want.extend_from_slice(&[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
    want.extend_from_slice(&[12, 0, 0, 0]);
    want.extend_from_slice(&[0xbb, 0xaa, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]);
    assert_eq!(b, want);
    assert_eq!(MAGIC, 0x5242_4442);
    let regs = encode(&Frame::reply(0, Reply::Regs(regs()))).unwrap();
    assert_eq!(regs.len(), HEADER_LEN + REGS_LEN);
    assert_eq!(
        &regs[HEADER_LEN + 40..HEADER_LEN + 48],
        &0x260_a000u64.to_le_bytes()
    );
    assert_eq!(&regs[HEADER_LEN + 88..], &[0, 1]);
}

#[test]
fn stream_byte_by_byte() {
    let frames = samples();
    let mut stream = Vec::new();
    for f in &frames {
        f.encode_into(&mut stream).unwrap();
    }
    let mut d = Decoder::new();
    let mut out = Vec::new();
    for b in &stream {
        d.push(std::slice::from_ref(b)).unwrap();
        while let Some(f) = d.next_frame().unwrap() {
            out.push(f);
        }
    }
    assert_eq!(out, frames);
    assert_eq!(d.buffered(), 0);
}

#[test]
fn stream_random_chunks() {
    let frames = samples();
    let mut stream = Vec::new();
    for f in &frames {
        f.encode_into(&mut stream).unwrap();
    }
    let mut rng = XorShift(0x5eed);
    for _ in 0..50 {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let n = 1 + rng.below(rest.len().min(5000));
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            d.push(chunk).unwrap();
            while let Some(f) = d.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames);
    }
}

#[test]
fn peer_stopping_mid_frame_yields_nothing() {
    let b = encode(&Frame::reply(1, Reply::Read(vec![1; 100]))).unwrap();
    for cut in 0..b.len() {
        let mut d = Decoder::new();
        d.push(&b[..cut]).unwrap();
        assert_eq!(d.next_frame(), Ok(None), "cut at {cut}");
        assert_eq!(d.next_frame(), Ok(None), "asking again is harmless");
        assert_eq!(d.buffered(), cut);
        assert!(matches!(
            decode(&b[..cut]),
            Err(WireError::Truncated { .. })
        ));
    }
}

#[test]
fn error_bad_magic() {
    let mut b = req(Op::FetchSb, &[]);
    b[0] = b'X';
    assert!(matches!(decode(&b), Err(WireError::BadMagic { .. })));
    // Detected as soon as the first wrong byte arrives, not after a whole header.
    let mut d = Decoder::new();
    d.push(b"BX").unwrap();
    assert!(matches!(d.next_frame(), Err(WireError::BadMagic { .. })));
    assert!(matches!(
        decode(b"GET / HTTP/1.1\r\n"),
        Err(WireError::BadMagic { .. })
    ));
}

#[test]
fn error_unsupported_version() {
    let b = raw(2, Op::FetchSb as u8, 0, &[]);
    assert_eq!(
        decode(&b),
        Err(WireError::UnsupportedVersion { version: 2 })
    );
}

#[test]
fn error_unknown_op() {
    for op in [0u8, 0x0c, 0x80, 0x8c, 0xfe] {
        assert_eq!(
            decode(&raw(VERSION, op, 0, &[])),
            Err(WireError::UnknownOp { op })
        );
    }
}

#[test]
fn error_reserved_flags() {
    let b = raw(VERSION, Op::Unlock as u8, 0x8000, &[]);
    assert_eq!(decode(&b), Err(WireError::ReservedFlags { flags: 0x8000 }));
}

#[test]
fn error_payload_too_large() {
    let h = Header {
        version: VERSION,
        op: Op::Write as u8,
        flags: 0,
        request_id: 0,
        payload_len: MAX_PAYLOAD + 1,
    };
    assert!(matches!(
        decode(&h.to_bytes()),
        Err(WireError::PayloadTooLarge { .. })
    ));
    let mut d = Decoder::new();
    d.push(&h.to_bytes()).unwrap();
    assert!(matches!(
        d.next_frame(),
        Err(WireError::PayloadTooLarge { .. })
    ));
    // A decoder with a tighter limit rejects smaller frames.
    let mut d = Decoder::with_limits(16, 0);
    d.push(&req(Op::Write, &[0; 17])[..HEADER_LEN]).unwrap();
    assert_eq!(
        d.next_frame(),
        Err(WireError::PayloadTooLarge { len: 17, max: 16 })
    );
    // Encoding refuses what decoding would.
    let w = Frame::request(
        0,
        Request::Write {
            gpa: 0,
            bytes: vec![0; MAX_PAYLOAD as usize - 7],
        },
    );
    assert!(matches!(encode(&w), Err(WireError::PayloadTooLarge { .. })));
    let r = Frame::reply(0, Reply::Read(vec![0; MAX_PAYLOAD as usize + 1]));
    assert!(matches!(encode(&r), Err(WireError::PayloadTooLarge { .. })));
}

#[test]
fn error_buffer_full_then_poisoned() {
    // Limits: 16-byte payloads, 40 buffered bytes (one 36-byte frame plus a little).
    let mut d = Decoder::with_limits(16, 40);
    let frame = req(Op::Write, &[1; 16]);
    d.push(&frame[..30]).unwrap();
    assert_eq!(d.next_frame(), Ok(None));
    assert_eq!(
        d.push(&[0; 11]),
        Err(WireError::BufferFull {
            buffered: 41,
            limit: 40
        })
    );
    assert!(d.is_poisoned());
    assert_eq!(d.next_frame(), Err(WireError::Poisoned));
    assert_eq!(d.push(&[]), Err(WireError::Poisoned));
    // Limits below one frame are raised to one frame.
    let mut d = Decoder::with_limits(16, 0);
    d.push(&frame).unwrap();
    assert!(d.next_frame().unwrap().is_some());
}

#[test]
fn error_truncated_and_trailing_frame() {
    let mut b = encode(&Frame::request(1, Request::Lock { lease_ms: 1 })).unwrap();
    assert_eq!(
        decode(&b[..b.len() - 1]),
        Err(WireError::Truncated {
            need: HEADER_LEN + 4,
            have: HEADER_LEN + 3
        })
    );
    b.push(0);
    assert_eq!(
        decode(&b),
        Err(WireError::TrailingBytes {
            op: "LOCK",
            where_: "frame",
            extra: 1
        })
    );
}

#[test]
fn error_malformed_short_payloads() {
    for (op, payload) in [
        (Op::Read, &[0u8; 11][..]),
        (Op::Lock, &[0; 3][..]),
        (Op::Regs, &[][..]),
        (Op::Write, &[0; 7][..]),
        (Op::Hello, &[0; 8][..]),
        (Op::ReadBatch, &[1][..]),
        (Op::HelloOk, &[0; 7][..]),
        (Op::LockOk, &[0; 7][..]),
        (Op::RegsOk, &[0; REGS_LEN - 1][..]),
        (Op::ReadBatchOk, &[1, 0, 5, 0, 0, 0, 1, 2][..]),
        (Op::Error, &[1][..]),
    ] {
        let e = decode(&req(op, payload)).unwrap_err();
        assert!(matches!(e, WireError::Malformed { .. }), "{op:?}: {e}");
    }
    // HELLO whose id length points past the payload.
    let mut p = 5u64.to_le_bytes().to_vec();
    p.push(10);
    p.extend_from_slice(b"abc");
    assert!(matches!(
        decode(&req(Op::Hello, &p)),
        Err(WireError::Malformed { .. })
    ));
    // READ_BATCH whose count does not match the ranges present.
    let mut p = 2u16.to_le_bytes().to_vec();
    p.extend_from_slice(&[0; 12]);
    assert!(matches!(
        decode(&req(Op::ReadBatch, &p)),
        Err(WireError::Malformed { .. })
    ));
    // Empty monitor id.
    let mut p = 5u64.to_le_bytes().to_vec();
    p.push(0);
    assert!(matches!(
        decode(&req(Op::Hello, &p)),
        Err(WireError::Malformed { .. })
    ));
}

#[test]
fn error_malformed_regs() {
    let good = encode(&Frame::reply(0, Reply::Regs(regs()))).unwrap();
    let mut b = good.clone();
    b[HEADER_LEN + 88] = 4; // cpl
    assert!(matches!(decode(&b), Err(WireError::Malformed { .. })));
    let mut b = good.clone();
    b[HEADER_LEN + 89] = 2; // presence byte
    assert!(matches!(decode(&b), Err(WireError::Malformed { .. })));
    let mut b = good;
    b[HEADER_LEN + 89] = 0; // absent, but value 0x20 present
    assert!(matches!(decode(&b), Err(WireError::Malformed { .. })));
    let bad = Frame::reply(0, Reply::Regs(Regs { cpl: 9, ..regs() }));
    assert!(matches!(encode(&bad), Err(WireError::Malformed { .. })));
}

#[test]
fn error_trailing_payload_bytes() {
    for (op, len) in [
        (Op::FetchSb, 1),
        (Op::Unlock, 2),
        (Op::Read, 13),
        (Op::Lock, 5),
        (Op::Regs, 2),
        (Op::HelloOk, 25),
        (Op::WriteOk, 1),
        (Op::LockOk, 9),
        (Op::UnlockOk, 1),
        (Op::RegsOk, REGS_LEN + 1),
    ] {
        let e = decode(&req(op, &vec![0; len])).unwrap_err();
        assert!(
            matches!(
                e,
                WireError::TrailingBytes {
                    where_: "payload",
                    ..
                }
            ),
            "{op:?}: {e}"
        );
    }
    let mut p = 1u64.to_le_bytes().to_vec();
    p.push(1);
    p.extend_from_slice(b"ab");
    assert!(matches!(
        decode(&req(Op::Hello, &p)),
        Err(WireError::TrailingBytes { extra: 1, .. })
    ));
    let mut p = 1u16.to_le_bytes().to_vec();
    p.extend_from_slice(&[1, 0, 0, 0, 9, 9]);
    assert!(matches!(
        decode(&req(Op::ReadBatchOk, &p)),
        Err(WireError::TrailingBytes { extra: 1, .. })
    ));
}

#[test]
fn error_too_many_ranges() {
    let mut p = 257u16.to_le_bytes().to_vec();
    p.extend_from_slice(&vec![0; 257 * 12]);
    assert_eq!(
        decode(&req(Op::ReadBatch, &p)),
        Err(WireError::TooManyRanges { count: 257 })
    );
    // Count checked before the ranges are even present.
    let p = u16::MAX.to_le_bytes();
    assert_eq!(
        decode(&req(Op::ReadBatch, &p)),
        Err(WireError::TooManyRanges { count: 65535 })
    );
    assert_eq!(
        decode(&req(Op::ReadBatchOk, &p)),
        Err(WireError::TooManyRanges { count: 65535 })
    );
    let f = Frame::request(0, Request::ReadBatch(vec![Range { gpa: 0, len: 1 }; 257]));
    assert_eq!(encode(&f), Err(WireError::TooManyRanges { count: 257 }));
    let f = Frame::reply(0, Reply::ReadBatch(vec![Vec::new(); 257]));
    assert_eq!(encode(&f), Err(WireError::TooManyRanges { count: 257 }));
}

#[test]
fn error_read_too_large() {
    let mut p = 0u64.to_le_bytes().to_vec();
    p.extend_from_slice(&(MAX_READ_LEN + 1).to_le_bytes());
    assert!(matches!(
        decode(&req(Op::Read, &p)),
        Err(WireError::ReadTooLarge { .. })
    ));
    // Two ranges that are each fine but whose reply would not fit in one frame.
    let ranges = vec![
        Range {
            gpa: 0,
            len: MAX_PAYLOAD / 2,
        };
        2
    ];
    let f = Frame::request(0, Request::ReadBatch(ranges.clone()));
    assert!(matches!(encode(&f), Err(WireError::ReadTooLarge { .. })));
    let mut p = 2u16.to_le_bytes().to_vec();
    for r in ranges {
        put_range(&mut p, r);
    }
    assert!(matches!(
        decode(&req(Op::ReadBatch, &p)),
        Err(WireError::ReadTooLarge { .. })
    ));
}

#[test]
fn error_range_overflow() {
    let mut p = (u64::MAX - 1).to_le_bytes().to_vec();
    p.extend_from_slice(&2u32.to_le_bytes());
    assert_eq!(
        decode(&req(Op::Read, &p)),
        Err(WireError::RangeOverflow {
            gpa: u64::MAX - 1,
            len: 2
        })
    );
    let mut p = u64::MAX.to_le_bytes().to_vec();
    p.push(1);
    assert!(matches!(
        decode(&req(Op::Write, &p)),
        Err(WireError::RangeOverflow { .. })
    ));
    let f = Frame::request(
        0,
        Request::Write {
            gpa: u64::MAX,
            bytes: vec![1],
        },
    );
    assert!(matches!(encode(&f), Err(WireError::RangeOverflow { .. })));
}

#[test]
fn error_strings() {
    let f = Frame::request(
        0,
        Request::Hello {
            monitor_id: "m".repeat(MAX_MONITOR_ID + 1),
            nonce: 0,
        },
    );
    assert!(matches!(encode(&f), Err(WireError::StringTooLong { .. })));
    let mut p = 0u64.to_le_bytes().to_vec();
    p.push(65);
    p.extend_from_slice(&[b'm'; 65]);
    assert!(matches!(
        decode(&req(Op::Hello, &p)),
        Err(WireError::StringTooLong { .. })
    ));
    let mut p = 0u64.to_le_bytes().to_vec();
    p.push(2);
    p.extend_from_slice(&[0xc3, 0x28]);
    assert_eq!(
        decode(&req(Op::Hello, &p)),
        Err(WireError::InvalidUtf8 {
            field: "monitor id"
        })
    );
    let f = Frame::reply(
        0,
        Reply::Error {
            code: 1,
            message: "e".repeat(MAX_ERROR_MESSAGE + 1),
        },
    );
    assert!(matches!(encode(&f), Err(WireError::StringTooLong { .. })));
    let mut p = 1u16.to_le_bytes().to_vec();
    p.extend_from_slice(&[b'e'; MAX_ERROR_MESSAGE + 1]);
    assert!(matches!(
        decode(&req(Op::Error, &p)),
        Err(WireError::StringTooLong { .. })
    ));
    let mut p = 1u16.to_le_bytes().to_vec();
    p.push(0xff);
    assert_eq!(
        decode(&req(Op::Error, &p)),
        Err(WireError::InvalidUtf8 {
            field: "error message"
        })
    );
}

#[test]
fn failed_encode_leaves_buffer_untouched() {
    let mut out = b"prefix".to_vec();
    let f = Frame::request(0, Request::ReadBatch(vec![Range { gpa: 0, len: 1 }; 300]));
    assert!(f.encode_into(&mut out).is_err());
    assert_eq!(out, b"prefix");
}

/// Feeds `bytes` to `decode` and to a `Decoder` in chunks; whatever decodes must re-encode to the
/// same bytes (the format is canonical). Panics only if that property fails.
fn exercise(bytes: &[u8], rng: &mut XorShift) {
    if let Ok(f) = decode(bytes) {
        assert_eq!(encode(&f).unwrap(), bytes);
    }
    let mut d = Decoder::with_limits(1 << 16, 1 << 17);
    let mut rest = bytes;
    let mut consumed = 0;
    while !rest.is_empty() {
        let n = 1 + rng.below(rest.len().min(64));
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        if d.push(chunk).is_err() {
            return;
        }
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    let e = encode(&f).unwrap();
                    assert_eq!(e, &bytes[consumed..consumed + e.len()]);
                    consumed += e.len();
                }
                Ok(None) => break,
                Err(_) => {
                    assert!(d.is_poisoned());
                    assert_eq!(d.next_frame(), Err(WireError::Poisoned));
                    assert_eq!(d.push(b"x"), Err(WireError::Poisoned));
                    return;
                }
            }
        }
    }
}

#[test]
fn random_and_mutated_input_never_panics() {
    let mut rng = XorShift(0x0bad_5eed_cafe_f00d);
    let valid: Vec<Vec<u8>> = samples().iter().map(|f| encode(f).unwrap()).collect();
    for i in 0..4000 {
        let input = match i % 4 {
            // Pure noise.
            0 => {
                let n = rng.below(300);
                rng.bytes(n)
            }
            // Noise behind a valid magic and version, so the header checks are passed often.
            1 => {
                let n = rng.below(200);
                let mut b = MAGIC_BYTES.to_vec();
                b.push(VERSION);
                let op = [
                    0x01u8, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x81, 0x84, 0x88, 0xff,
                ][rng.below(12)];
                b.push(op);
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(&rng.next().to_le_bytes());
                b.extend_from_slice(&(n as u32).to_le_bytes());
                b.extend(rng.bytes(n));
                b
            }
            // A valid frame with a few bytes changed.
            2 => {
                let mut b = valid[rng.below(valid.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(b.len());
                    b[at] = rng.next() as u8;
                }
                b
            }
            // A valid frame truncated, extended, or followed by another.
            _ => {
                let mut b = valid[rng.below(valid.len())].clone();
                match rng.below(3) {
                    0 => b.truncate(rng.below(b.len())),
                    1 => {
                        let n = 1 + rng.below(16);
                        b.extend(rng.bytes(n))
                    }
                    _ => b.extend_from_slice(&valid[rng.below(valid.len())]),
                }
                b
            }
        };
        exercise(&input, &mut rng);
    }
}

#[test]
fn errors_render_actionable_messages() {
    let e = WireError::BufferFull {
        buffered: 10,
        limit: 5,
    };
    assert!(e.to_string().contains("drain frames"));
    let e = WireError::UnsupportedVersion { version: 9 };
    assert!(e.to_string().contains("speaks 1"));
}
