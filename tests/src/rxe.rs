//! The SoftRoCE VM: the bridge's RDMA verbs transport run for real, on Soft-RoCE (`rdma_rxe`).
//!
//! One QEMU-TCG VM boots the kernel variant `rxe` (`images/kernel/build.sh --variant rxe`:
//! networking, InfiniBand, user verbs, Soft-RoCE) with the base initramfs of `images/rxe/build.sh`
//! and a per-run archive (`images/rxe/pack.sh`). Inside, `/init` (`images/rxe/init`) puts an rxe
//! device on each end of a veth pair (rxe0, rxe1), runs `rdma-bridge serve --dump` (feature
//! `verbs`, device rxe0) in network namespace A and the monitor side, `bd-verbs-check` (device
//! rxe1), in namespace B — their TLS channel over a second veth pair between A and B — prints the
//! checker's JSON lines on the console and powers off.
//!
//! The memory the bridge serves is a real patched guest's: [`memory_image`] boots it under
//! `bdvmm --engine tcg`, waits for its Sensor Box, pauses it and copies its RAM into a raw dump.
//!
//! QEMU runs directly, not under bdvmm: the VM is a lab, not a guest being healed — it needs a
//! PCI/ACPI machine (power-off), a second CPU for the two sides and nothing of bdvmm's API or
//! backdoor, exactly as the kvm host ([`crate::kvmhost`]) does.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rdma_bridge::tls;

use crate::child::Spawned;
use crate::kvmhost::host::repo_root;
use crate::site::Engine;
use crate::vm::{Vm, VmSpec};
use crate::Images;

/// The checks `bd-verbs-check` must report, each with `"ok":true` (the interface between the
/// checker and this VM; see `rdma-bridge/src/bin/bd-verbs-check.rs`).
pub const CHECKS: &[&str] = &[
    "rdma_connect_rw",
    "read_sb_rdma",
    "read_tasks_rdma",
    "write_hooks_rdma",
    "write_without_lock_refused",
    "ro_cannot_write",
    "guessed_rkey_refused",
    "closed_session_qp_gone",
    "qp_quota",
];

/// The monitor with read `sb`+`ram`, write `hooks` (and `lock`, where the config knows it).
pub const MONITOR_RW: &str = "monitor-rw";
/// The monitor with read `sb` only.
pub const MONITOR_RO: &str = "monitor-ro";
/// Where the bridge listens inside the VM (namespace A, on the control veth).
pub const BRIDGE_ADDR: &str = "10.78.0.1:7070";
/// RAM of the guest whose memory becomes the image (MiB): small, the image rides in the initrd.
pub const IMAGE_GUEST_MIB: u64 = 192;
/// RAM of the SoftRoCE VM (MiB): the initrd with the image, its unpacked copy, two programs.
pub const VM_MIB: u64 = 1024;
/// From the image guest's start to its `halt wait` line, worst case on a loaded machine.
pub const IMAGE_BOOT_TIMEOUT: Duration = Duration::from_secs(4 * 60);
/// From QEMU's start to its power-off, worst case on a loaded machine.
pub const VM_TIMEOUT: Duration = Duration::from_secs(9 * 60);
/// How long the checker may run inside the VM (seconds; its own bound, under `VM_TIMEOUT`).
pub const CHECK_TIMEOUT_S: u64 = 420;
/// READs per transport for the latency figures.
pub const READS: u32 = 2000;

/// The SoftRoCE VM's images, from `images.env`; `Err` says why they are absent (the kernel
/// variant could not be built) — a reason to skip, never to pass.
pub struct RxeImages {
    /// `BD_RXE_KERNEL`: the bzImage of the `rxe` variant.
    pub kernel: PathBuf,
    /// `BD_RXE_INITRD`: the base initramfs of `images/rxe/build.sh`.
    pub initrd: PathBuf,
}

impl RxeImages {
    /// Both keys, if `images/build.sh` wrote them and the files exist.
    pub fn find(img: &Images) -> Result<RxeImages, String> {
        let get = |key: &str| {
            img.opt(key)
                .map(Path::to_path_buf)
                .ok_or_else(|| format!("{} has no {key} (or its file is gone): images/build.sh could not build the SoftRoCE VM's images", Images::env_path().display()))
        };
        Ok(RxeImages {
            kernel: get("BD_RXE_KERNEL")?,
            initrd: get("BD_RXE_INITRD")?,
        })
    }
}

/// The verbs binaries the VM carries (`rdma-bridge` and `bd-verbs-check`, release, feature
/// `verbs`): `$BD_RXE_BIN_DIR`, else `<target>/rxe/`, where `make rxe-bins` copies them (they
/// are kept apart from `<target>/release/rdma-bridge`, which the kvm hosts carry without verbs).
pub fn verbs_bins() -> Result<Vec<PathBuf>, String> {
    let dir = crate::kvmhost::host::target_subdir("BD_RXE_BIN_DIR", "rxe");
    ["rdma-bridge", "bd-verbs-check"]
        .iter()
        .map(|b| {
            let p = dir.join(b);
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!(
                    "{} not built; run `make rxe-bins` (`make test` does): \
                     cargo build --release -p rdma-bridge --features verbs --bins, copied to {}",
                    p.display(),
                    dir.display()
                ))
            }
        })
        .collect()
}

/// A patched guest's RAM in a raw dump (file offset = guest-physical address), and its backdoor
/// range (gpa, size): boots `BD_KERNEL_BZIMAGE` + `BD_INITRAMFS` under bdvmm's tcg engine,
/// waits until the Sensor Box reads back whole, pauses the guest, copies every RAM range out of
/// the memfd, and stops it.
pub fn memory_image(img: &Images, out: &Path) -> (u64, u64) {
    let mut spec = VmSpec::on(
        Engine::Tcg,
        img.get("BD_KERNEL_BZIMAGE"),
        img.get("BD_INITRAMFS"),
        "quiet bd.scenario=hello bd.halt=wait",
    );
    spec.mem = IMAGE_GUEST_MIB;
    let mut vm = Vm::start(&spec);
    vm.expect("BACKDOORS: halt wait", IMAGE_BOOT_TIMEOUT);
    let mem = vm.guest_mem();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = mem.sensor_box() {
        assert!(
            Instant::now() < deadline,
            "the Sensor Box never read back whole: {e}\n{}",
            vm.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(mem);
    let mut client = vm.client();
    client
        .pause(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("pause the image guest: {e}\n{}", vm.diagnostics()));
    let (memfd, map) = vm.client().memory().expect("memory over the API");
    let dump = File::create(out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    let mut buf = vec![0u8; 1 << 20];
    for r in &map.ranges {
        let mut done = 0u64;
        while done < r.size {
            let step = (r.size - done).min(1 << 20);
            let chunk = &mut buf[..introspect::conv::usize_from(step)];
            memfd
                .read_exact_at(chunk, r.offset + done)
                .expect("read the memfd");
            // All-zero chunks stay holes: the image is mostly free memory.
            if chunk.iter().any(|&b| b != 0) {
                dump.write_all_at(chunk, r.gpa + done)
                    .expect("write the memory image");
            }
            done += step;
        }
        dump.set_len(dump.metadata().expect("stat").len().max(r.gpa + r.size))
            .expect("size the memory image");
    }
    dump.sync_all().expect("sync the memory image");
    let _ = client.resume();
    (map.backdoor.gpa, map.backdoor.size)
}

/// Writes the run directory the VM finds at `/opt/bd/run/`: `pki/` (CA, the bridge's and both
/// monitors' keys), `bridge.toml`, `run.env`; the memory image is `mem.raw` next to them.
pub fn write_run_dir(dir: &Path, backdoor: (u64, u64)) {
    let pki = dir.join("pki");
    tls::pki_init(&pki, tls::DEFAULT_SERVER_NAME).expect("pki init");
    for m in [MONITOR_RW, MONITOR_RO] {
        tls::pki_issue(&pki, m).expect("pki issue");
    }
    let cfg = |lock: &str| {
        format!(
            "listen = \"{BRIDGE_ADDR}\"\naudit_log = \"/tmp/audit.jsonl\"\n\
             [tls]\nca = \"pki/ca.pem\"\ncert = \"pki/bridge.pem\"\nkey = \"pki/bridge.key\"\n\
             [agreement]\nk = 1\nwindow_ms = 2000\n\
             [[monitor]]\nname = \"{MONITOR_RW}\"\ncert = \"pki/{MONITOR_RW}.pem\"\n\
             read = [\"sb\", \"ram\"]\nwrite = [\"hooks\"]\n{lock}\
             [[monitor]]\nname = \"{MONITOR_RO}\"\ncert = \"pki/{MONITOR_RO}.pem\"\nread = [\"sb\"]\n\
             [rdma]\ndevice = \"rxe0\"\n"
        )
    };
    let path = dir.join("bridge.toml");
    std::fs::write(&path, cfg("lock = true\n")).expect("write bridge.toml");
    if let Err(e) = rdma_bridge::config::BridgeConfig::load(&path) {
        panic!("the SoftRoCE VM's bridge config does not load: {e}");
    }
    let env = format!(
        "BACKDOOR={:#x}+{:#x}\nRW={MONITOR_RW}\nRO={MONITOR_RO}\nSERVER_NAME={}\n\
         READS={READS}\nCHECK_TIMEOUT={CHECK_TIMEOUT_S}\nCHECK_DEVICE=rxe1\n",
        backdoor.0,
        backdoor.1,
        tls::DEFAULT_SERVER_NAME
    );
    std::fs::write(dir.join("run.env"), env).expect("write run.env");
}

/// Packs the per-run initrd: the base image, `bins`, and `run_dir` at `/opt/bd/run/`.
pub fn pack(base: &Path, run_dir: &Path, bins: &[PathBuf], out: &Path) {
    let res = Command::new("bash")
        .arg(repo_root().join("images/rxe/pack.sh"))
        .arg("--base")
        .arg(base)
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--out")
        .arg(out)
        .args(bins)
        .output()
        .expect("run images/rxe/pack.sh");
    assert!(
        res.status.success(),
        "images/rxe/pack.sh failed ({}):\n{}",
        res.status,
        String::from_utf8_lossy(&res.stderr)
    );
}

/// What one run of the VM printed, parsed.
pub struct RxeRun {
    /// The whole console.
    pub console: String,
    /// Each check's result by name: (ok, detail).
    pub checks: BTreeMap<String, (bool, String)>,
    /// The `{"bench":...}` lines, as printed.
    pub bench: Vec<String>,
    /// The checker's exit status (`RXE: checker exit N`), if it ran.
    pub checker_exit: Option<i32>,
    /// Did the VM end by itself within its bound?
    pub powered_off: bool,
    /// Packets each end of the RDMA wire sent and received (`RXE: wire`): (tx, rx) by device.
    pub wire: BTreeMap<String, (u64, u64)>,
}

impl RxeRun {
    /// The console tail and what is missing: for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- SoftRoCE VM console (last 150 lines) ---\n{}",
            self.console
                .lines()
                .rev()
                .take(150)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    }
}

/// Boots the SoftRoCE VM with `initrd` and waits (at most [`VM_TIMEOUT`]) for it to power off.
pub fn run_vm(kernel: &Path, initrd: &Path) -> RxeRun {
    let mut cmd = Command::new(
        std::env::var_os("BD_RXE_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into()),
    );
    cmd.args(["-M", "pc", "-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-smp", "2", "-m", &format!("{VM_MIB}M")])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"]);
    let mut vm = Spawned::start(cmd, "SoftRoCE VM (qemu)");
    let powered_off = vm.wait_exit(VM_TIMEOUT).is_some();
    let console = vm.output().replace('\r', "");
    drop(vm);
    parse(console, powered_off)
}

/// Parses the console of one run.
pub fn parse(console: String, powered_off: bool) -> RxeRun {
    let mut checks = BTreeMap::new();
    let mut bench = Vec::new();
    let mut checker_exit = None;
    let mut wire = BTreeMap::new();
    for line in console.lines() {
        if let Some(rest) = line.strip_prefix("RXE: checker exit ") {
            checker_exit = rest.trim().parse().ok();
            continue;
        }
        if let Some(rest) = line.strip_prefix("RXE: wire ") {
            let mut words = rest.split_whitespace();
            let dev = words.next().unwrap_or_default().to_owned();
            let mut count = |key: &str| {
                words
                    .next()
                    .and_then(|w| w.strip_prefix(key))
                    .and_then(|n| n.parse::<u64>().ok())
            };
            if let (Some(tx), Some(rx)) = (count("tx_packets="), count("rx_packets=")) {
                wire.insert(dev, (tx, rx));
            }
            continue;
        }
        // A kernel message may share the line: take the JSON object from its brace.
        let Some(start) = line.find("{\"") else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line[start..]) else {
            continue;
        };
        if let Some(name) = v["check"].as_str() {
            let ok = v["ok"].as_bool() == Some(true);
            let detail = v["detail"].as_str().unwrap_or_default().to_owned();
            checks.insert(name.to_owned(), (ok, detail));
        } else if v.get("bench").is_some() {
            bench.push(line[start..].to_owned());
        }
    }
    RxeRun {
        console,
        checks,
        bench,
        checker_exit,
        powered_off,
        wire,
    }
}
