//! `make demo` as a newcomer runs it (the tcg engine, as `ENGINE=auto` picks on a CPU without
//! vmx/svm): the same fork bomb first without bdmon, then with it; the demo must end by itself,
//! with status 0, a summary table of both runs, and the healed run visibly better than the
//! crippled one. Uses the release binaries (`make test` builds them first).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use backdoors_tests::child::Spawned;
use backdoors_tests::Images;

/// The demo's whole run on tcg takes well under two minutes; this bounds a demo that hangs.
const BOUND: Duration = Duration::from_secs(600);

fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/release
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    target.join("release")
}

/// The seconds of a summary row's "iterations after the bomb" column ("18.8 s (2.7 at baseline)").
fn after_bomb_seconds(row: &str) -> f64 {
    let after = row
        .split(" ms ")
        .nth(2)
        .unwrap_or_else(|| panic!("row: {row}"));
    after
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no seconds in row: {row}"))
}

#[test]
fn make_demo_shows_the_bomb_without_and_with_bdmon_and_exits_0_by_itself() {
    let bin = release_dir();
    for b in ["bdvmm", "rdma-bridge", "bdmon"] {
        assert!(
            bin.join(b).exists(),
            "{} missing; run `make release` (`make test` does)",
            bin.join(b).display()
        );
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new(root.join("scripts/demo.sh"));
    cmd.env("DEMO_ENGINE", "tcg")
        .env("IMAGES_ENV", Images::env_path())
        .env("DEMO_BIN_DIR", &bin);
    let t0 = Instant::now();
    let mut demo = Spawned::start(cmd, "make demo");
    let status = demo.wait_exit(BOUND);
    let out = demo.output();
    let status = status.unwrap_or_else(|| panic!("the demo did not end within {BOUND:?}:\n{out}"));
    eprintln!("make demo ended in {:.0?}:\n{out}", t0.elapsed());
    assert!(status.success(), "the demo failed ({status}):\n{out}");
    assert!(out.contains("1/2: the fork bomb WITHOUT bdmon"), "{out}");
    assert!(
        out.contains("healed: useful finished at its baseline pace"),
        "{out}"
    );
    let row = |name: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no summary row {name:?}:\n{out}"))
            .to_owned()
    };
    let (without, with) = (row("without bdmon"), row("with bdmon"));
    assert!(with.contains("repair(s) by bdmon"), "{with}");
    let (slow, fast) = (after_bomb_seconds(&without), after_bomb_seconds(&with));
    assert!(
        fast < slow,
        "the healed run was not faster than the crippled one: {slow} s without bdmon, {fast} s with"
    );
}
