//! Who may use bdvmm's control socket (issue 12, hole 6), at the seam: the real API server and
//! event loop with a stand-in engine behind them, no guest booted.
//!
//! Foreign users are real: the test (root) runs its own binary again as uid/gid 65534 (`nobody`)
//! with `API_ACCESS_CHILD` set, and that child connects, asks, and prints what it got.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;

use bdvmm::api::server::{AccessPolicy, ApiServer};
use bdvmm::api::{ApiClient, ApiError};
use bdvmm::console::Console;
use bdvmm::engine::{Engine, EngineError, Ready};
use bdvmm::layout::MemoryLayout;
use bdvmm::memory::GuestRam;
use bdvmm::vmm::Vmm;
use bdvmm_api::VcpuRegs;
use introspect::consistency::Pausable;

const NOBODY: u32 = 65534;
const CHILD_ENV: &str = "API_ACCESS_CHILD";

/// An engine with nothing behind it: pauses and resumes succeed at once.
struct NoEngine;

impl Pausable for NoEngine {
    type Error = EngineError;
    fn pause(&mut self) -> Result<(), EngineError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), EngineError> {
        Ok(())
    }
}

impl Engine for NoEngine {
    fn name(&self) -> &'static str {
        "none"
    }
    fn vcpus(&self) -> u8 {
        1
    }
    fn regs(&mut self, _: u8) -> Result<VcpuRegs, EngineError> {
        Err(EngineError::Unsupported("no engine in this test"))
    }
    fn reset(&mut self) -> Result<(), EngineError> {
        Ok(())
    }
    fn serial_input(&mut self, _: &[u8]) {}
    fn watch_fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }
    fn on_ready(&mut self, _: std::os::fd::RawFd) -> Ready {
        Ready::Handled
    }
    fn terminate(&mut self) {}
}

/// A directory the child (uid 65534) can traverse but not list or write.
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    dir
}

/// Runs a VMM (API server, event loop, stand-in engine) on `sock` for the rest of the test
/// process; returns once the socket is listening.
fn serve(sock: &Path, bind: impl FnOnce(&Path) -> ApiServer + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let sock = sock.to_path_buf();
    std::thread::spawn(move || {
        let api = bind(&sock);
        let ram = GuestRam::new(MemoryLayout::new(64).unwrap()).unwrap();
        let console = Console::new(false, None).unwrap();
        let vmm = Vmm::new(
            Box::new(NoEngine),
            ram,
            console,
            Some(api),
            std::time::Duration::from_secs(2),
            String::new(),
            false,
        )
        .unwrap();
        tx.send(()).unwrap();
        let _ = vmm.run();
    });
    rx.recv().unwrap();
}

/// Runs this test binary's `child` as uid/gid 65534 against `sock`, doing `what`; its output.
fn as_nobody(sock: &Path, what: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, format!("{what}:{}", sock.display()))
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// One `key=value` line of the child's output.
fn field(out: &str, key: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in child output:\n{out}"))
        .to_string()
}

fn describe<T>(r: Result<T, ApiError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(ApiError::Refused(m)) => format!("refused: {m}"),
        Err(e) => format!("error: {e}"),
    }
}

/// The child's side (does nothing in a normal test run).
#[test]
fn child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (what, sock) = spec.split_once(':').unwrap();
    let sock = PathBuf::from(sock);
    // The harness printed "test child ... " without a newline.
    println!();
    // SAFETY: getuid has no failure mode.
    println!("uid={}", unsafe { libc::getuid() });
    let mut c = match ApiClient::connect(&sock) {
        Ok(c) => c,
        Err(e) => {
            println!("connect=error: {e}");
            return;
        }
    };
    println!("connect=ok");
    println!("status={}", describe(c.status()));
    if what == "readonly" {
        match c.memory() {
            Ok((file, reply)) => {
                let len = usize::try_from(reply.size.min(1 << 20)).unwrap();
                let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
                for (name, prot) in [
                    ("mmap_write", libc::PROT_READ | libc::PROT_WRITE),
                    ("mmap_read", libc::PROT_READ),
                ] {
                    // SAFETY: a fresh shared mapping of a file we own; unmapped at once.
                    let p = unsafe {
                        libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0)
                    };
                    if p == libc::MAP_FAILED {
                        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                        println!("{name}=errno {errno}");
                    } else {
                        // SAFETY: `p` is the mapping of `len` bytes made just above.
                        unsafe { libc::munmap(p, len) };
                        println!("{name}=ok");
                    }
                }
                // Nor can the descriptor be reopened writable through /proc.
                let reopen = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(format!("/proc/self/fd/{fd}"));
                match reopen {
                    Ok(_) => println!("reopen_rw=ok"),
                    Err(e) => println!("reopen_rw=errno {}", e.raw_os_error().unwrap_or(0)),
                }
            }
            Err(e) => println!("memory={}", describe::<()>(Err(e))),
        }
        println!("pause={}", describe(c.pause(None)));
        println!("reset={}", describe(c.reset()));
    }
}

#[test]
fn socket_is_0600_under_umask_000() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    // The umask is per process; no other test here depends on it.
    // SAFETY: umask has no failure mode.
    let old = unsafe { libc::umask(0) };
    serve(&sock, |p| ApiServer::bind(p).unwrap());
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "API socket mode {mode:o} under umask 000");
    // Nothing else was left next to it (the private staging directory is gone).
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("api.sock")]);
    // And the owner is served.
    assert!(ApiClient::connect(&sock).unwrap().status().is_ok());
}

#[test]
fn a_foreign_uid_is_refused_even_if_the_socket_mode_lets_it_in() {
    let dir = shared_dir();
    let sock = dir.path().join("api.sock");
    serve(&sock, |p| ApiServer::bind(p).unwrap());
    // An operator (or a bug) opened the socket to everyone: the credential check still holds.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&sock, "status");
    assert_eq!(field(&out, "uid"), NOBODY.to_string());
    let status = field(&out, "status");
    assert!(
        status.starts_with("refused: uid 65534") && status.contains("--api-allow-uid"),
        "uid 65534 should be refused with a message naming the flag, got: {status}"
    );
    // The owner still is served.
    assert!(ApiClient::connect(&sock).unwrap().status().is_ok());
}

#[test]
fn a_readonly_uid_gets_a_readonly_memfd_and_no_pause() {
    let dir = shared_dir();
    let sock = dir.path().join("api.sock");
    let mut policy = AccessPolicy::owner_and_root();
    policy.readonly_uids.push(NOBODY);
    policy.socket_group = Some(NOBODY);
    serve(&sock, move |p| ApiServer::bind_with(p, policy).unwrap());
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o660, "with a socket group the mode is 0660");
    let out = as_nobody(&sock, "readonly");
    assert_eq!(field(&out, "connect"), "ok");
    assert_eq!(field(&out, "status"), "ok");
    assert_eq!(
        field(&out, "mmap_write"),
        format!("errno {}", libc::EACCES),
        "a writable shared mapping of the read-only client's memfd must fail with EACCES"
    );
    assert_eq!(field(&out, "mmap_read"), "ok");
    assert_eq!(
        field(&out, "reopen_rw"),
        format!("errno {}", libc::EACCES),
        "reopening the read-only descriptor read-write through /proc must fail"
    );
    let pause = field(&out, "pause");
    assert!(
        pause.starts_with("refused: uid 65534 has read-only access"),
        "{pause}"
    );
    assert!(field(&out, "reset").starts_with("refused:"));
    // A full client can still pause.
    let mut owner = ApiClient::connect(&sock).unwrap();
    assert!(owner.pause(None).is_ok());
}
