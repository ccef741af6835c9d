//! A full disk under the audit log (issue 12, hole 8): the bridge refuses the WRITE (and the LOCK)
//! it cannot record, and guest memory stays as it was.
//!
//! The disk is a real one: a 256 KiB tmpfs mounted by the test (it runs as root, as the project's
//! tests do) and filled with a file until the kernel answers ENOSPC. That exercises what happens on
//! a host — a regular file, opened and checked at start, that stops taking appends half-way
//! through a session. `/dev/full` would not: it is a device, which the bridge refuses as an audit
//! log at start (and must), so the failure would never reach the WRITE path.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{Config, Monitor, Scratch, HOOKS};
use rdma_bridge::client::ClientError;
use rdma_bridge::tls;
use rdma_bridge::wire::code;

/// A small tmpfs in a directory of its own, unmounted on drop (before the directory goes).
struct Tmpfs {
    at: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount() -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("disk");
        std::fs::create_dir_all(&at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs"])
            .arg(&at)
            .status()
            .expect("mount(8) runs");
        assert!(
            status.success(),
            "cannot mount a tmpfs at {} (this test needs root)",
            at.display()
        );
        Tmpfs { at, _dir: dir }
    }

    /// Writes a filler file until the filesystem is full.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.at.join("filler")).unwrap();
        let block = [0xAAu8; 4096];
        loop {
            if let Err(e) = f.write_all(&block).and_then(|()| f.sync_all()) {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                return;
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.at)
            .status();
    }
}

#[test]
fn a_write_the_audit_log_cannot_record_is_refused_and_memory_is_unchanged() {
    let scratch = Scratch::new(&["mon1"]);
    let disk = Tmpfs::mount();
    // 4 MiB of "guest RAM" in a file on the real disk, the audit log on the small one.
    let backend = Arc::new(scratch.dump(&vec![0u8; common::RAM_SIZE], true));
    let audit_log = disk.at.join("audit.jsonl");
    let audit_log = audit_log.to_str().expect("a UTF-8 temporary path");
    let config = Config {
        audit_log,
        top: "",
        monitors: &[Monitor::healer("mon1", false)],
        tables: "",
    };
    let fx = scratch.serve(&config, backend, |_, _| {});

    let mut mon = fx.connect("mon1").unwrap();
    // With room on the disk: locked, written, recorded.
    mon.lock(Duration::from_secs(10)).unwrap();
    mon.write(HOOKS, b"first").unwrap();
    assert_eq!(mon.read(HOOKS, 5).unwrap(), b"first");

    disk.fill();
    // The log's last page may still have room for a few records: write until one is refused
    // (a page holds a few dozen; the bound only keeps a regression from looping for ever).
    let mut last = b"first\0\0\0".to_vec();
    let mut refused = None;
    for i in 0..1000u32 {
        let bytes = format!("w{i:07}").into_bytes();
        match mon.write(HOOKS, &bytes) {
            Ok(()) => last = bytes,
            Err(e) => {
                refused = Some((e, bytes));
                break;
            }
        }
    }
    let (refused, attempted) = refused.expect("WRITEs went on being applied on a full disk");
    match &refused {
        ClientError::Remote { code: c, message } => {
            assert_eq!(*c, code::INTERNAL, "{message}");
            assert!(
                message.contains("nothing was written") && message.contains("audit log"),
                "the refusal should say why: {message}"
            );
        }
        other => panic!("expected a refusal, got {other}"),
    }
    let now = mon.read(HOOKS, 8).unwrap();
    assert_ne!(now, attempted, "the refused WRITE reached guest memory");
    assert_eq!(
        now, last,
        "guest memory must be unchanged by a WRITE the audit log could not record"
    );
    // A LOCK it cannot record is refused as well (the guest is not paused).
    mon.unlock().unwrap();
    let lock = mon.lock(Duration::from_secs(1)).unwrap_err();
    assert_eq!(lock.code(), Some(code::INTERNAL), "{lock}");

    // Room again: writes are recorded and applied again.
    std::fs::remove_file(disk.at.join("filler")).unwrap();
    mon.lock(Duration::from_secs(10)).unwrap();
    mon.write(HOOKS, b"third").unwrap();
    assert_eq!(mon.read(HOOKS, 5).unwrap(), b"third");
    let log = std::fs::read_to_string(&fx.audit).unwrap();
    for l in log.lines() {
        serde_json::from_str::<serde_json::Value>(l).expect("every audit line is whole JSON");
    }
    assert!(log.ends_with('\n'), "the last record is whole");
    let last_line: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last_line["event"], "write_applied");
    assert_eq!(last_line["sha256"], tls::fingerprint(b"third"));
}
