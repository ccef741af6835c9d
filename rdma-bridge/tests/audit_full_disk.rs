//! A full disk under the audit log (issue 12, hole 8): the bridge refuses the WRITE (and the LOCK)
//! it cannot record, and guest memory stays as it was.
//!
//! The disk is a real one: a 256 KiB tmpfs mounted by the test (it runs as root, as the project's
//! tests do) and filled with a file until the kernel answers ENOSPC. That exercises what happens on
//! a host — a regular file, opened and checked at start, that stops taking appends half-way
//! through a session. `/dev/full` would not: it is a device, which the bridge refuses as an audit
//! log at start (and must), so the failure would never reach the WRITE path.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use introspect::mem::{MappedMem, Range};
use rdma_bridge::backend::{Backend, BackendError, Layout};
use rdma_bridge::client::{Bridge, ClientError};
use rdma_bridge::config::BridgeConfig;
use rdma_bridge::server::Server;
use rdma_bridge::tls::{self, Identity};
use rdma_bridge::wire::{code, Regs, VmStatus};

const BACKDOOR: u64 = 0x10_0000;
const HOOKS: u64 = BACKDOOR + 0x2000;

/// Guest memory in a writable file, with no VM behind it.
struct FileBackend {
    mem: MappedMem,
    layout: Layout,
}

impl Backend for FileBackend {
    fn layout(&self) -> &Layout {
        &self.layout
    }
    fn mem(&self) -> &MappedMem {
        &self.mem
    }
    fn pause(&self, _: Duration) -> Result<u64, BackendError> {
        Ok(0)
    }
    fn resume(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn regs(&self, _: u8) -> Result<Regs, BackendError> {
        Err(BackendError::NotLive("has no vCPUs"))
    }
    fn status(&self) -> Result<VmStatus, BackendError> {
        Err(BackendError::NotLive("has no vCPUs"))
    }
    fn restart(&self) -> Result<(), BackendError> {
        Err(BackendError::NotLive("cannot be restarted"))
    }
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs"])
            .arg(at)
            .status()
            .expect("mount(8) runs");
        assert!(
            status.success(),
            "cannot mount a tmpfs at {} (this test needs root)",
            at.display()
        );
        Tmpfs(at.to_path_buf())
    }

    /// Writes a filler file until the filesystem is full.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
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
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_write_the_audit_log_cannot_record_is_refused_and_memory_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    tls::pki_init(&pki, tls::DEFAULT_SERVER_NAME).unwrap();
    tls::pki_issue(&pki, "mon1").unwrap();
    let disk = Tmpfs::mount(&dir.path().join("disk"));

    // 4 MiB of "guest RAM" in a file on the real disk.
    let ram_path = dir.path().join("ram");
    std::fs::write(&ram_path, vec![0u8; 4 << 20]).unwrap();
    let ram = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&ram_path)
        .unwrap();
    let mem = MappedMem::new(
        ram,
        4 << 20,
        vec![Range {
            gpa: 0,
            size: 4 << 20,
            offset: 0,
        }],
        true,
    )
    .unwrap();
    let backend = Arc::new(FileBackend {
        mem,
        layout: Layout {
            ram: vec![(0, 4 << 20)],
            backdoor: (BACKDOOR, 1 << 20),
        },
    });

    let cfg_path = dir.path().join("bridge.toml");
    std::fs::write(
        &cfg_path,
        r#"
listen = "127.0.0.1:0"
audit_log = "disk/audit.jsonl"
[tls]
ca = "pki/ca.pem"
cert = "pki/bridge.pem"
key = "pki/bridge.key"
[[monitor]]
name = "mon1"
cert = "pki/mon1.pem"
read = ["sb", "ram"]
write = ["hooks"]
"#,
    )
    .unwrap();
    let cfg = BridgeConfig::load(&cfg_path).unwrap();
    let server = Server::bind(&cfg, backend).unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.run());

    let mut mon = Bridge::connect(addr, &Identity::from_pki_dir(&pki, "mon1")).unwrap();
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
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    mon.lock(Duration::from_secs(10)).unwrap();
    mon.write(HOOKS, b"third").unwrap();
    assert_eq!(mon.read(HOOKS, 5).unwrap(), b"third");
    let log = std::fs::read_to_string(disk.0.join("audit.jsonl")).unwrap();
    for l in log.lines() {
        serde_json::from_str::<serde_json::Value>(l).expect("every audit line is whole JSON");
    }
    assert!(log.ends_with('\n'), "the last record is whole");
    let last_line: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last_line["event"], "write_applied");
    assert_eq!(last_line["sha256"], tls::fingerprint(b"third"));
}
