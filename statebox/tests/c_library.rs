//! The C library (`c/`): `make test` (its example and its own tests, which pin the same check
//! vectors as the Rust tests), then a region written by C parsed with `statebox::abi`.
//! Skipped, with the reason printed, where gcc or make is missing.
#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::process::Command;

use statebox::abi::{check, parse_region};

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn build_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("statebox-c")
}

#[test]
fn c_library() {
    for tool in ["gcc", "make"] {
        if !have(tool) {
            println!("c_library skipped: {tool} is not installed");
            return;
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("c");
    let build = build_dir();
    let out = Command::new("make")
        .arg("-C")
        .arg(&src)
        .arg("CC=gcc")
        .arg(format!("BUILD={}", build.display()))
        .arg("test")
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "make -C statebox/c test failed");

    // The same vectors as c/test.c.
    assert_eq!(check(1, 1, b""), 0x4307_45c1_c6fa_3d5a);
    assert_eq!(
        check(0x1122_3344_5566_7788, 7, b"hello, state box"),
        0xed76_f211_762f_b694
    );

    // A region written by the C library, read as a monitor reads it.
    let dump = build.join("region.bin");
    let status = Command::new(build.join("statebox-test"))
        .arg("--dump")
        .arg(&dump)
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&dump).unwrap();
    let snap = parse_region(&bytes).unwrap();
    assert_eq!(snap.header.slot_count, 4);
    assert_eq!(snap.header.capacity, 64);
    assert_ne!(snap.header.region_generation, 0);
    assert_eq!(snap.header.next_generation, 4);
    assert!(snap.bad.is_empty(), "{:?}", snap.bad);
    let boxes: Vec<(u64, &[u8])> = snap
        .boxes
        .iter()
        .map(|b| (b.id, b.data.as_slice()))
        .collect();
    assert_eq!(boxes, vec![(1, &b"second"[..]), (3, &b"c state"[..])]);
    assert_eq!(snap.boxes[0].generation, 1);
    assert_eq!(snap.boxes[1].generation, 3);
}
