//! Bad input gets one line that says what to do, a non-zero exit, and never a panic or a hang.

use std::os::unix::net::UnixListener;
use std::time::Duration;

use backdoors_tests::vm::{run_to_end, Vm, VmSpec};
use backdoors_tests::Images;

/// Runs bdvmm, expects exit 2 and a single `bdvmm: error:` line containing `needle`.
fn refused(args: &[&str], needle: &str) {
    let (status, stderr) = run_to_end(args, Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{args:?} -> {status}\n{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("bdvmm: error:"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "{args:?}: expected one error line:\n{stderr}"
    );
    assert!(
        errors[0].contains(needle),
        "{args:?}: {:?} lacks {needle:?}",
        errors[0]
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn kernel() -> String {
    Images::load()
        .get("BD_KERNEL_BZIMAGE")
        .display()
        .to_string()
}

fn initrd() -> String {
    Images::load().get("BD_INITRAMFS").display().to_string()
}

#[test]
fn missing_or_corrupt_kernel() {
    refused(
        &["run", "--kernel", "/nonexistent/bzImage"],
        "cannot read kernel /nonexistent/bzImage",
    );
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x42u8; 4096]).unwrap();
    refused(
        &["run", "--kernel", junk.to_str().unwrap(), "--engine", "tcg"],
        "is neither an ELF vmlinux nor a bzImage",
    );
    refused(&["run", "--kernel", "/tmp"], "is a directory");
}

#[test]
fn missing_or_corrupt_initrd() {
    let k = kernel();
    refused(
        &["run", "--kernel", &k, "--initrd", "/nonexistent/initrd"],
        "cannot read initrd",
    );
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.cpio");
    std::fs::write(&junk, b"definitely not a cpio archive").unwrap();
    refused(
        &["run", "--kernel", &k, "--initrd", junk.to_str().unwrap()],
        "is not a cpio archive",
    );
}

#[test]
fn bad_disks() {
    let k = kernel();
    let dir = tempfile::tempdir().unwrap();
    for engine in ["kvm", "tcg"] {
        refused(
            &[
                "run",
                "--kernel",
                &k,
                "--engine",
                engine,
                "--disk",
                "/nonexistent/root.img",
            ],
            "cannot open disk image /nonexistent/root.img",
        );
        refused(
            &[
                "run",
                "--kernel",
                &k,
                "--engine",
                engine,
                "--disk",
                "/dev/null,ro",
            ],
            "neither a regular file nor a block device",
        );
    }
    // A second writer is refused while the first holds the image.
    let img = dir.path().join("root.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let held = bdvmm::devices::block::Block::open(&img, false).unwrap();
    refused(
        &[
            "run",
            "--kernel",
            &k,
            "--engine",
            "tcg",
            "--disk",
            img.to_str().unwrap(),
        ],
        "is in use by another VM",
    );
    drop(held);
    let Err(e) = "x.img,cache=none".parse::<bdvmm::devices::bus::DiskSpec>() else {
        panic!("an unknown disk option parsed");
    };
    assert!(e.to_string().contains("cache=none"), "{e}");
    let (status, stderr) = run_to_end(
        &["run", "--kernel", &k, "--disk", "x.img,cache=none"],
        Duration::from_secs(30),
    );
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not known"), "{stderr}");
}

#[test]
fn bad_nets() {
    let k = kernel();
    // bdvmm never creates a tap; both engines check it before the guest starts.
    for engine in ["kvm", "tcg"] {
        refused(
            &[
                "run",
                "--kernel",
                &k,
                "--engine",
                engine,
                "--net",
                "tap=bdnone9",
            ],
            "no tap device \"bdnone9\": create it first (ip tuntap add bdnone9 mode tap",
        );
    }
    for (value, needle) in [
        ("tap0", "is not known"),
        ("tap=a/b", "a tap name has 1 to 15 characters"),
        ("tap=t0,mac=01:00:00:00:00:01", "unicast"),
        ("mac=02:00:00:00:00:01", "needs a tap"),
    ] {
        let (status, stderr) = run_to_end(
            &["run", "--kernel", &k, "--net", value],
            Duration::from_secs(30),
        );
        assert_eq!(status.code(), Some(2), "{value}: {stderr}");
        assert!(stderr.contains(needle), "{value}: {stderr}");
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.toml");
    std::fs::write(
        &cfg,
        format!("kernel = {k:?}\n[[net]]\ntap = \"t0\"\nmac = \"zz\"\n"),
    )
    .unwrap();
    refused(
        &["run", "--config", cfg.to_str().unwrap()],
        "the --config file's [[net]]: --net mac=\"zz\"",
    );
}

/// A tap made for a test, deleted on drop.
struct TestTap(String);

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .status();
    }
}

#[test]
fn a_tap_without_permission_or_without_vhost_net() {
    let name = format!("bdbad{}", std::process::id() % 100_000);
    let made = std::process::Command::new("ip")
        .args(["tuntap", "add", &name, "mode", "tap"])
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        eprintln!("skipped: cannot create a tap here (not root?)");
        return;
    }
    let _tap = TestTap(name.clone());
    let k = kernel();
    let net = format!("tap={name}");
    // The kvm engine attaches the tap and opens /dev/vhost-net before touching KVM.
    if std::path::Path::new("/dev/vhost-net").exists() {
        eprintln!("this host has /dev/vhost-net: its absence is not tested here");
    } else {
        refused(
            &["run", "--kernel", &k, "--engine", "kvm", "--net", &net],
            "no /dev/vhost-net: modprobe vhost_net",
        );
    }
    // An unprivileged user may not attach root's tap: one line, exit 2.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let kcopy = dir.path().join("bzImage");
    std::fs::copy(&k, &kcopy).unwrap();
    std::fs::set_permissions(&kcopy, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    for engine in ["kvm", "tcg"] {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(backdoors_tests::bdvmm_bin())
            .args(["run", "--kernel"])
            .arg(&kcopy)
            .args(["--engine", engine, "--net", &net])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{engine}: {stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("bdvmm: error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{engine}: {stderr}");
        assert!(
            errors[0].contains(&format!("permission denied attaching tap \"{name}\"")),
            "{engine}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn bad_config_files() {
    let dir = tempfile::tempdir().unwrap();
    refused(
        &["run", "--config", "/nonexistent/vm.toml"],
        "cannot read the VM config /nonexistent/vm.toml",
    );
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "kernal = \"bzImage\"\n").unwrap();
    refused(&["run", "--config", typo.to_str().unwrap()], "kernal");
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    refused(&["run", "--config", empty.to_str().unwrap()], "no kernel");
    refused(&["run"], "no kernel");
    // The file's values are checked like flags, and a flag wins over the file.
    let small = dir.path().join("small.toml");
    std::fs::write(&small, format!("kernel = {:?}\nmem_mib = 0\n", kernel())).unwrap();
    refused(
        &["run", "--config", small.to_str().unwrap()],
        "--mem 0 MiB is out of range",
    );
    refused(
        &[
            "run",
            "--config",
            small.to_str().unwrap(),
            "--mem",
            "64",
            "--vcpus",
            "0",
        ],
        "--vcpus 0 is out of range",
    );
}

#[test]
fn absurd_sizes() {
    let k = kernel();
    refused(
        &["run", "--kernel", &k, "--mem", "0"],
        "--mem 0 MiB is out of range",
    );
    refused(
        &["run", "--kernel", &k, "--mem", "99999999"],
        "is out of range",
    );
    refused(
        &["run", "--kernel", &k, "--vcpus", "0"],
        "--vcpus 0 is out of range",
    );
    refused(
        &["run", "--kernel", &k, "--vcpus", "200"],
        "--vcpus 200 is out of range",
    );
    refused(
        &["run", "--kernel", &k, "--lease-ms", "0"],
        "--lease-ms 0 is out of range",
    );
    let long = "x".repeat(3000);
    refused(
        &["run", "--kernel", &k, "--cmdline", &long],
        "kernel command line is",
    );
}

#[test]
fn busy_or_bad_socket_path() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("busy.sock");
    let _listener = UnixListener::bind(&sock).unwrap();
    let k = kernel();
    refused(
        &["run", "--kernel", &k, "--api", sock.to_str().unwrap()],
        "is in use by another process",
    );
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    refused(
        &["run", "--kernel", &k, "--api", file.to_str().unwrap()],
        "is not a socket",
    );
    refused(
        &["run", "--kernel", &k, "--api", "/nonexistent/dir/api.sock"],
        "cannot listen on API socket",
    );
}

#[test]
fn no_kvm_and_no_qemu() {
    let k = kernel();
    refused(
        &[
            "run",
            "--kernel",
            &k,
            "--engine",
            "kvm",
            "--kvm-device",
            "/nonexistent/kvm",
        ],
        "cannot open /nonexistent/kvm",
    );
    refused(
        &[
            "run",
            "--kernel",
            &k,
            "--engine",
            "tcg",
            "--qemu",
            "/nonexistent/qemu-system-x86_64",
        ],
        "install Debian package qemu-system-x86",
    );
    refused(
        &[
            "run",
            "--kernel",
            &k,
            "--engine",
            "tcg",
            "--qemu",
            "no-such-qemu-binary",
        ],
        "no-such-qemu-binary not found",
    );
}

#[test]
fn qemu_that_crashes_is_reported() {
    // A "QEMU" that dies by a signal right away stands for a crashing one.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("qemu");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'fake qemu: about to crash' >&2\nkill -SEGV $$\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (status, stderr) = run_to_end(
        &[
            "run",
            "--kernel",
            &kernel(),
            "--engine",
            "tcg",
            "--qemu",
            fake.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert_ne!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("QEMU"), "{stderr}");
    assert!(stderr.contains("fake qemu: about to crash"), "{stderr}");
}

#[test]
fn bad_api_requests_get_errors_and_the_vm_keeps_serving() {
    let img = Images::load();
    let spec = VmSpec::tcg(
        img.get("BD_KERNEL_BZIMAGE"),
        &std::path::PathBuf::from(initrd()),
        "bd.scenario=hello bd.halt=wait",
    );
    let mut vm = Vm::start(&spec);
    vm.expect("BACKDOORS: ready", Duration::from_secs(60));
    let mut c = vm.client();
    for bad in [
        &b"not json\n"[..],
        b"{\"cmd\":\"explode\"}\n",
        b"{\"cmd\":\"pause\",\"lease_ms\":0}\n",
        b"{\"cmd\":\"regs\",\"vcpu\":7}\n",
    ] {
        let v = c.raw(bad).unwrap();
        assert_eq!(v["ok"], false, "{v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    // An oversized request is answered and the connection closed; others keep working.
    let mut big = vec![b'x'; 10_000];
    big.push(b'\n');
    let v = vm.client().raw(&big).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(c.status().unwrap().state, "running");
    assert!(c.regs(0).is_ok());
}

/// Runs `bin args` with its stdout a pipe whose reader is already gone (as in `… | head` once
/// head has its lines): the command must end quietly — killed by SIGPIPE, as Unix tools are —
/// never with a panic (`failed printing to stdout: Broken pipe`, exit 101).
fn ends_quietly_on_a_closed_pipe(bin: &str, args: &[&str]) {
    use std::os::unix::process::ExitStatusExt;
    let mut child = std::process::Command::new(backdoors_tests::workspace_bin(bin))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{bin}: {e}"));
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{bin} {args:?}: {stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{bin} {args:?}: {} {stderr}",
        out.status
    );
}

#[test]
fn printing_commands_end_quietly_when_their_reader_goes_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let pki = pki.to_str().expect("utf-8 path");
    ends_quietly_on_a_closed_pipe("rdma-bridge", &["pki", "init", "--dir", pki]);
    ends_quietly_on_a_closed_pipe(
        "rdma-bridge",
        &["pki", "issue", "--dir", pki, "--name", "m"],
    );
    let cfg = dir.path().join("bdmon.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[guest]]\nname = \"g\"\nbridge = \"127.0.0.1:1\"\npki = \"{pki}\"\nmonitor = \"m\"\n"
        ),
    )
    .expect("config");
    ends_quietly_on_a_closed_pipe(
        "bdmon",
        &["check", "--config", cfg.to_str().expect("utf-8")],
    );
}

/// A guest bdmon cannot read (its bridge refuses connections) is reported on stderr with the
/// reason, and then at a backed-off rate — not once per 10 ms sample, and never silently.
#[test]
fn bdmon_reports_an_unreadable_guest_on_stderr_at_a_backed_off_rate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let pki = pki.to_str().expect("utf-8 path");
    let bridge = backdoors_tests::workspace_bin("rdma-bridge");
    for args in [
        vec!["pki", "init", "--dir", pki],
        vec!["pki", "issue", "--dir", pki, "--name", "m"],
    ] {
        let st = std::process::Command::new(&bridge)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("rdma-bridge pki");
        assert!(st.success(), "rdma-bridge {args:?}: {st}");
    }
    let cfg = dir.path().join("bdmon.toml");
    std::fs::write(
        &cfg,
        format!(
            "sample_ms = 10\nevents = \"events.jsonl\"\n[[guest]]\nname = \"g\"\n\
             bridge = \"127.0.0.1:1\"\npki = \"{pki}\"\nmonitor = \"m\"\n"
        ),
    )
    .expect("config");
    let out = std::process::Command::new(backdoors_tests::workspace_bin("bdmon"))
        .args([
            "run",
            "--config",
            cfg.to_str().expect("utf-8"),
            "--for",
            "8",
        ])
        .output()
        .expect("bdmon run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("guest g: sample failed"))
        .collect();
    // 8 s of 10 ms samples would be 800 lines; backed off, a handful.
    assert!(
        (2..=12).contains(&lines.len()),
        "{} report line(s):\n{stderr}",
        lines.len()
    );
    assert!(
        lines[0].contains("127.0.0.1:1") || lines[0].to_lowercase().contains("refused"),
        "the reason is not said: {}",
        lines[0]
    );
    let waits: Vec<f64> = lines
        .iter()
        .filter_map(|l| l.rsplit("next try in ").next())
        .filter_map(|w| w.trim_end_matches(" s").trim().parse().ok())
        .collect();
    assert_eq!(
        waits.len(),
        lines.len(),
        "every line says when the next try is:\n{stderr}"
    );
    assert!(
        waits.windows(2).all(|w| w[1] >= w[0]) && waits.last() > waits.first(),
        "not backing off: {waits:?}"
    );
}
