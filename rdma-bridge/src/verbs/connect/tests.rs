//! Tests of the connect-blob codec: round trips, the documented layout, and every rejection.

#![allow(
    // Test fixtures: small, fixed values built by the test itself.
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]
use super::*;

fn endpoint() -> Endpoint {
    Endpoint {
        qp_num: 0x00ab_cdef,
        psn: 0x0012_3456,
        lid: 7,
        mtu: 3,
        gid: Some([
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x02, 0x11, 0x22, 0xff, 0xfe, 0x33, 0x44, 0x55,
        ]),
    }
}

fn region(name: &str, gpa: u64, len: u64, access: Access) -> RegionInfo {
    RegionInfo {
        name: name.to_owned(),
        gpa,
        len,
        remote_addr: 0x7f00_0000_0000 + gpa,
        rkey: 0x1234_5678,
        access,
    }
}

fn table() -> Vec<RegionInfo> {
    vec![
        region("sb", 0x10_0000, 0x1000, Access::RemoteRead),
        region("tasks", 0x20_0000, 0x10_0000, Access::RemoteRead),
        region("hooks", 0x10_1000, 0x40, Access::RemoteWrite),
    ]
}

#[test]
fn round_trip() {
    let ep = endpoint();
    let regions = table();
    let blob = encode_connect(&ep, &regions).unwrap();
    assert_eq!(
        blob.len(),
        CONNECT_HEADER_LEN + 3 * REGION_RECORD_LEN + "sb".len() + "tasks".len() + "hooks".len()
    );
    let (ep2, regions2) = decode_connect(&blob).unwrap();
    assert_eq!(ep2, ep);
    assert_eq!(regions2, regions);
}

#[test]
fn round_trip_without_gid_and_regions() {
    let ep = Endpoint {
        gid: None,
        ..endpoint()
    };
    let blob = encode_connect(&ep, &[]).unwrap();
    assert_eq!(blob.len(), CONNECT_HEADER_LEN);
    assert_eq!(decode_connect(&blob).unwrap(), (ep, Vec::new()));
}

#[test]
fn layout_is_little_endian_as_documented() {
    let blob = encode_connect(&endpoint(), &table()[..1]).unwrap();
    assert_eq!(&blob[0..4], b"BDRV");
    assert_eq!(blob[4], 1);
    assert_eq!(blob[5], 1);
    assert_eq!(blob[6], 3);
    assert_eq!(blob[7], 1);
    assert_eq!(&blob[8..12], &0x00ab_cdef_u32.to_le_bytes());
    assert_eq!(&blob[12..16], &0x0012_3456_u32.to_le_bytes());
    assert_eq!(&blob[16..18], &7u16.to_le_bytes());
    assert_eq!(&blob[18..20], &[0, 0]);
    assert_eq!(blob[20], 0xfe);
    let rec = &blob[36..];
    assert_eq!(rec[0], 1);
    assert_eq!(rec[1], 2);
    assert_eq!(&rec[2..6], &0x1234_5678_u32.to_le_bytes());
    assert_eq!(&rec[6..14], &0x10_0000_u64.to_le_bytes());
    assert_eq!(&rec[14..22], &0x1000_u64.to_le_bytes());
    assert_eq!(
        &rec[22..30],
        &(0x7f00_0000_0000_u64 + 0x10_0000).to_le_bytes()
    );
    assert_eq!(&rec[30..], b"sb");
}

#[test]
fn largest_blob_fits() {
    let regions: Vec<RegionInfo> = (0..MAX_REGIONS)
        .map(|i| {
            let name = format!("{i:0>32}");
            region(&name, (i as u64) << 20, 1 << 20, Access::RemoteRead)
        })
        .collect();
    let blob = encode_connect(&endpoint(), &regions).unwrap();
    assert_eq!(blob.len(), 4004);
    assert!(blob.len() <= MAX_CONNECT_LEN);
    assert_eq!(decode_connect(&blob).unwrap().1, regions);
}

#[test]
fn every_truncation_is_rejected() {
    let blob = encode_connect(&endpoint(), &table()).unwrap();
    for cut in 0..blob.len() {
        match decode_connect(&blob[..cut]) {
            Err(VerbsError::ConnectTruncated { len, .. }) => assert_eq!(len, cut),
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
}

#[test]
fn oversized_blob_is_rejected() {
    let blob = vec![0u8; MAX_CONNECT_LEN + 1];
    assert!(matches!(
        decode_connect(&blob),
        Err(VerbsError::ConnectTooLong { len }) if len == MAX_CONNECT_LEN + 1
    ));
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut blob = encode_connect(&endpoint(), &table()).unwrap();
    blob.push(0);
    assert!(matches!(
        decode_connect(&blob),
        Err(VerbsError::TrailingBytes { count: 1 })
    ));
}

#[test]
fn bad_magic_version_flags_reserved() {
    let good = encode_connect(&endpoint(), &[]).unwrap();
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(
        decode_connect(&b),
        Err(VerbsError::ConnectMagic { .. })
    ));
    let mut b = good.clone();
    b[4] = 2;
    assert!(matches!(
        decode_connect(&b),
        Err(VerbsError::ConnectVersion { version: 2 })
    ));
    let mut b = good.clone();
    b[5] = 0x03;
    assert!(matches!(
        decode_connect(&b),
        Err(VerbsError::ConnectReserved { .. })
    ));
    let mut b = good.clone();
    b[19] = 1;
    assert!(matches!(
        decode_connect(&b),
        Err(VerbsError::ConnectReserved { .. })
    ));
    // GID bytes without the GID flag.
    let mut b = good.clone();
    b[5] = 0;
    assert!(matches!(
        decode_connect(&b),
        Err(VerbsError::ConnectReserved { .. })
    ));
}

#[test]
fn bad_endpoints_are_rejected() {
    let cases = [
        Endpoint {
            qp_num: 0,
            ..endpoint()
        },
        Endpoint {
            qp_num: 1,
            ..endpoint()
        },
        Endpoint {
            qp_num: QPN_LIMIT,
            ..endpoint()
        },
        Endpoint {
            psn: QPN_LIMIT,
            ..endpoint()
        },
        Endpoint {
            mtu: 0,
            ..endpoint()
        },
        Endpoint {
            mtu: 6,
            ..endpoint()
        },
        Endpoint {
            lid: 0,
            gid: None,
            ..endpoint()
        },
        Endpoint {
            gid: Some([0; 16]),
            ..endpoint()
        },
    ];
    let good = encode_connect(&endpoint(), &[]).unwrap();
    for ep in cases {
        assert!(
            matches!(
                encode_connect(&ep, &[]),
                Err(VerbsError::BadEndpoint { .. })
            ),
            "encode accepted {ep:?}"
        );
        // The same fields patched into a good blob are rejected by the decoder.
        let mut b = good.clone();
        b[5] = u8::from(ep.gid.is_some());
        b[6] = ep.mtu;
        b[8..12].copy_from_slice(&ep.qp_num.to_le_bytes());
        b[12..16].copy_from_slice(&ep.psn.to_le_bytes());
        b[16..18].copy_from_slice(&ep.lid.to_le_bytes());
        b[20..36].copy_from_slice(&ep.gid.unwrap_or([0; 16]));
        assert!(
            matches!(decode_connect(&b), Err(VerbsError::BadEndpoint { .. })),
            "decode accepted {ep:?}"
        );
    }
}

#[test]
fn too_many_regions_are_rejected() {
    let regions: Vec<RegionInfo> = (0..=MAX_REGIONS)
        .map(|i| {
            region(
                &format!("r{i}"),
                (i as u64) << 12,
                0x1000,
                Access::RemoteRead,
            )
        })
        .collect();
    assert!(matches!(
        encode_connect(&endpoint(), &regions),
        Err(VerbsError::TooManyRegions { count: 65 })
    ));
    let mut blob = encode_connect(&endpoint(), &regions[..MAX_REGIONS]).unwrap();
    blob[7] = 65;
    assert!(matches!(
        decode_connect(&blob),
        Err(VerbsError::TooManyRegions { count: 65 })
    ));
    blob[7] = 255;
    assert!(matches!(
        decode_connect(&blob),
        Err(VerbsError::TooManyRegions { count: 255 })
    ));
}

#[test]
fn bad_names_are_rejected() {
    let long = "n".repeat(MAX_NAME_LEN + 1);
    for name in ["", long.as_str(), "has space", "tab\t", "caf\u{e9}"] {
        let r = region(name, 0, 1, Access::RemoteRead);
        assert!(
            matches!(
                encode_connect(&endpoint(), &[r]),
                Err(VerbsError::BadName { .. })
            ),
            "encode accepted {name:?}"
        );
    }
    // A name of exactly MAX_NAME_LEN is fine.
    let ok = region(&"n".repeat(MAX_NAME_LEN), 0, 1, Access::RemoteRead);
    encode_connect(&endpoint(), &[ok]).unwrap();

    let good = encode_connect(&endpoint(), &[region("ab", 0, 1, Access::RemoteRead)]).unwrap();
    let name_len_at = CONNECT_HEADER_LEN + 1;
    let name_at = CONNECT_HEADER_LEN + REGION_RECORD_LEN;
    // Declared length 0, and 33 (longer than the limit) with enough bytes present.
    let mut b = good.clone();
    b[name_len_at] = 0;
    b.truncate(name_at);
    assert!(matches!(
        decode_connect(&b),
        Err(VerbsError::BadName { .. })
    ));
    let mut b = good.clone();
    b[name_len_at] = (MAX_NAME_LEN + 1) as u8;
    b.truncate(name_at);
    b.extend_from_slice(&[b'x'; MAX_NAME_LEN + 1]);
    assert!(matches!(
        decode_connect(&b),
        Err(VerbsError::BadName { .. })
    ));
    // Declared length 255 with few bytes present: still a name error, no over-read.
    let mut b = good.clone();
    b[name_len_at] = 255;
    assert!(matches!(
        decode_connect(&b),
        Err(VerbsError::BadName { .. })
    ));
    // Control byte, space, non-ASCII byte in the name.
    for bad in [0x07u8, b' ', 0xc3] {
        let mut b = good.clone();
        b[name_at] = bad;
        assert!(matches!(
            decode_connect(&b),
            Err(VerbsError::BadName { .. })
        ));
    }
}

#[test]
fn duplicate_names_are_rejected() {
    let regions = vec![
        region("sb", 0, 0x1000, Access::RemoteRead),
        region("sb", 0x1000, 0x1000, Access::RemoteWrite),
    ];
    assert!(matches!(
        encode_connect(&endpoint(), &regions),
        Err(VerbsError::DuplicateName { .. })
    ));
    let mut regions = regions;
    regions[1].name = "sc".to_owned();
    let mut blob = encode_connect(&endpoint(), &regions).unwrap();
    let last = blob.len() - 1;
    blob[last] = b'b';
    assert!(matches!(
        decode_connect(&blob),
        Err(VerbsError::DuplicateName { .. })
    ));
}

#[test]
fn bad_access_byte_is_rejected() {
    let good = encode_connect(&endpoint(), &table()[..1]).unwrap();
    for byte in [0u8, 3, 0x81, 0xff] {
        let mut b = good.clone();
        b[CONNECT_HEADER_LEN] = byte;
        assert!(
            matches!(decode_connect(&b), Err(VerbsError::BadAccess { byte: got }) if got == byte)
        );
    }
}

#[test]
fn empty_and_overflowing_regions_are_rejected() {
    let empty = region("e", 0x1000, 0, Access::RemoteRead);
    assert!(matches!(
        encode_connect(&endpoint(), &[empty]),
        Err(VerbsError::EmptyRegion { .. })
    ));
    let gpa_overflow = RegionInfo {
        gpa: u64::MAX - 0xfff,
        remote_addr: 0x1000,
        ..region("g", 0, 0x1000, Access::RemoteRead)
    };
    assert!(matches!(
        encode_connect(&endpoint(), std::slice::from_ref(&gpa_overflow)),
        Err(VerbsError::RegionOverflow { what: "gpa", .. })
    ));
    let addr_overflow = RegionInfo {
        remote_addr: u64::MAX,
        ..region("a", 0, 2, Access::RemoteWrite)
    };
    assert!(matches!(
        encode_connect(&endpoint(), std::slice::from_ref(&addr_overflow)),
        Err(VerbsError::RegionOverflow {
            what: "remote_addr",
            ..
        })
    ));

    // The decoder catches the same things in a patched blob.
    let good = encode_connect(&endpoint(), &[region("g", 0, 0x1000, Access::RemoteRead)]).unwrap();
    let rec = CONNECT_HEADER_LEN;
    let mut b = good.clone();
    b[rec + 6..rec + 14].copy_from_slice(&(u64::MAX - 0xfff).to_le_bytes());
    assert!(matches!(
        decode_connect(&b),
        Err(VerbsError::RegionOverflow { what: "gpa", .. })
    ));
    let mut b = good.clone();
    b[rec + 22..rec + 30].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        decode_connect(&b),
        Err(VerbsError::RegionOverflow {
            what: "remote_addr",
            ..
        })
    ));
    let mut b = good.clone();
    b[rec + 14..rec + 22].copy_from_slice(&0u64.to_le_bytes());
    assert!(matches!(
        decode_connect(&b),
        Err(VerbsError::EmptyRegion { .. })
    ));
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap deterministic fuzz: flip every byte of a valid blob to several values.
    let good = encode_connect(&endpoint(), &table()).unwrap();
    for i in 0..good.len() {
        for v in [0u8, 1, 0x7f, 0x80, 0xff] {
            let mut b = good.clone();
            b[i] = v;
            let _ = decode_connect(&b);
        }
    }
}
