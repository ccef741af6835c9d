//! Booting a kvm host: QEMU TCG with `-cpu max` (emulated AMD-V with nested paging) running the
//! stock Debian kernel with kvm-amd, its base image from `images/kvmhost/build.sh` and, appended,
//! a per-run archive (`images/kvmhost/pack.sh`) with this checkout's release binaries and the
//! guest images. Its only network is a tap device on this machine: the kvm host is a separate
//! host on a real (virtual) wire, as a target host is for a remote monitor.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::remote::{self, RemoteChild};
use crate::child::Spawned;
use crate::netns::{free_subnet, NetLock};
use crate::Images;

/// The agent's port inside every kvm host.
pub const AGENT_PORT: u16 = 7000;
/// How long a kvm host may take from QEMU start to its agent answering.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// The binaries every kvm host carries, from this checkout's release build.
pub const BINARIES: &[&str] = &["bdvmm", "rdma-bridge", "bd-kvmhost"];

/// Where the guest images sit inside a kvm host (see `images/kvmhost/pack.sh`).
const INSIDE_IMAGES: &[(&str, &str)] = &[
    ("BD_KERNEL_BZIMAGE", "/opt/bd/images/bzImage"),
    ("BD_STOCK_VMLINUZ", "/opt/bd/images/stock-vmlinuz"),
    ("BD_STOCK612_VMLINUZ", "/opt/bd/images/stock612-vmlinuz"),
    ("BD_INITRAMFS", "/opt/bd/images/initramfs.cpio.gz"),
];

/// Size of a kvm host.
#[derive(Clone, Debug)]
pub struct KvmHostOptions {
    /// RAM in MiB (the guests inside need theirs from it).
    pub mem_mib: u64,
    /// vCPUs (QEMU MTTCG threads).
    pub smp: u8,
    /// Raw images given to the kvm host as virtio disks, `/dev/vda` first, each with QEMU's
    /// `snapshot=on`: the kvm host (and bdvmm's guests inside, through `--disk /dev/vdX`) may
    /// write to them, and the writes vanish with the kvm host, never reaching the image.
    pub disks: Vec<PathBuf>,
    /// More programs of this machine to carry at `/opt/bd/bin/<name>` (with their libraries),
    /// e.g. load generators; a kvm host with any (or with `qemu`) gets an initrd of its own.
    pub extra_bins: Vec<PathBuf>,
    /// Also carry this machine's `qemu-system-x86_64` and its firmware (`images/kvmhost/pack.sh
    /// --qemu`; run it there with `-L /opt/bd/share/qemu`).
    pub qemu: bool,
}

impl Default for KvmHostOptions {
    fn default() -> Self {
        Self {
            mem_mib: 3072,
            smp: 2,
            disks: Vec::new(),
            extra_bins: Vec::new(),
            qemu: false,
        }
    }
}

/// A running kvm host. Dropping it stops QEMU; its tap device goes with it.
pub struct KvmHost {
    qemu: Spawned,
    /// The kvm host's address on the tap link.
    pub ip: String,
    /// This machine's address on the tap link.
    pub host_ip: String,
    /// The tap device's name.
    pub tap: String,
    agent: SocketAddr,
    next: AtomicU32,
}

static SUBNET: AtomicU32 = AtomicU32::new(0);

/// The workspace root (this crate's parent).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// A directory of this workspace's build output: `$<env>` if set, else `<target>/<name>`, found
/// from the running executable (`target/<profile>[/deps]/<test>`).
pub fn target_subdir(env: &str, name: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("current exe");
        let mut d = exe.parent().expect("exe dir").to_path_buf();
        if d.file_name().is_some_and(|n| n == "deps") {
            d.pop();
        }
        d.pop();
        d.join(name)
    })
}

/// A binary of this workspace's release build: `$BD_RELEASE_DIR/<name>`, else
/// `<target>/release/<name>` next to the running executable's profile directory.
pub fn release_bin(name: &str) -> PathBuf {
    target_subdir("BD_RELEASE_DIR", "release").join(name)
}

/// The kvm host's initrd for this process: the cached base image with this checkout's binaries
/// and the guest images appended (packed once per process).
pub fn packed_initrd() -> Result<PathBuf, String> {
    static PACKED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PACKED.get_or_init(|| pack(&[], false, "")).clone()
}

/// The initrd for a kvm host with `opts`: [`packed_initrd`] unless it asks for more programs,
/// else one packed for it (`run-<pid>.<n>.initrd`).
fn initrd_for(opts: &KvmHostOptions) -> Result<PathBuf, String> {
    if opts.extra_bins.is_empty() && !opts.qemu {
        return packed_initrd();
    }
    static N: AtomicU32 = AtomicU32::new(0);
    pack(
        &opts.extra_bins,
        opts.qemu,
        &format!(".{}", N.fetch_add(1, Ordering::SeqCst)),
    )
}

/// Runs `images/kvmhost/pack.sh` for [`BINARIES`] and `extra`, into
/// `kvmhost-run/run-<pid><suffix>.initrd` of the cache.
fn pack(extra: &[PathBuf], qemu: bool, suffix: &str) -> Result<PathBuf, String> {
    let mut bins: Vec<PathBuf> = BINARIES.iter().map(|b| release_bin(b)).collect();
    for b in &bins {
        if !b.exists() {
            return Err(format!(
                "{} not built; run `make release` (`make test` does)",
                b.display()
            ));
        }
    }
    bins.extend(extra.iter().cloned());
    let dir = crate::cache_dir().join("kvmhost-run");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    prune_dead_runs(&dir);
    let out = dir.join(format!("run-{}{suffix}.initrd", std::process::id()));
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("images/kvmhost/pack.sh"))
        .arg("--out")
        .arg(&out)
        .arg("--images-env")
        .arg(Images::env_path());
    if qemu {
        cmd.arg("--qemu");
    }
    cmd.arg("--").args(&bins);
    let res = cmd
        .output()
        .map_err(|e| format!("cannot run images/kvmhost/pack.sh: {e}"))?;
    if !res.status.success() {
        return Err(format!(
            "images/kvmhost/pack.sh failed ({}):\n{}",
            res.status,
            String::from_utf8_lossy(&res.stderr)
        ));
    }
    Ok(out)
}

/// Removes packed initrds of processes that no longer exist.
fn prune_dead_runs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("run-")
            .and_then(|r| r.split('.').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e} (install iproute2)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl KvmHost {
    /// Boots a kvm host and waits until its agent answers.
    pub fn start(opts: &KvmHostOptions) -> Result<KvmHost, String> {
        let img = Images::load();
        let initrd = initrd_for(opts)?;
        // Held until our side of the tap has its address (see NetLock).
        let net_lock = NetLock::take();
        let n = free_subnet(
            "10.232",
            std::process::id() * 7 + SUBNET.fetch_add(1, Ordering::SeqCst),
        )?;
        let tap = format!("bdkh{}x{n}", std::process::id() % 10_000);
        let (host_ip, guest_ip) = (format!("10.232.{n}.1"), format!("10.232.{n}.2"));
        let mut cmd = Command::new(
            std::env::var_os("BD_KVMHOST_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into()),
        );
        if let Some(data) = std::env::var_os("BD_KVMHOST_QEMU_DATA") {
            cmd.arg("-L").arg(data);
        }
        let accel = std::env::var("BD_KVMHOST_ACCEL").unwrap_or_else(|_| "tcg,thread=multi".into());
        // Without CX16: QEMU 7.2's multi-threaded TCG mishandles CMPXCHG16B with a segment
        // prefix, which Linux 6.12 guests use in SLUB's fast path (see the tcg engine); a kvm
        // host without it offers its guests none either.
        cmd.args(["-M", "pc", "-accel", &accel, "-cpu", "max,-cx16"])
            .args(["-smp", &opts.smp.to_string()])
            .args(["-m", &format!("{}M", opts.mem_mib)])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-monitor", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(img.get("BD_KVMHOST_KERNEL"))
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet panic=-1 bdkh.ip={guest_ip}/24 bdkh.agent={AGENT_PORT}"
            ))
            .arg("-netdev")
            .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
            .args(["-device", "virtio-net-pci,netdev=n0"]);
        for disk in &opts.disks {
            let mut drive = std::ffi::OsString::from("file=");
            drive.push(disk);
            drive.push(",format=raw,if=virtio,snapshot=on");
            cmd.arg("-drive").arg(drive);
        }
        // SAFETY: prctl in the child before exec; PR_SET_PDEATHSIG only sets a process attribute.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut qemu = Spawned::start(cmd, "kvm host (qemu-system-x86_64)");
        let t0 = Instant::now();
        let deadline = t0 + BOOT_TIMEOUT;
        let fail = |qemu: &Spawned, what: String| {
            format!(
                "kvm host: {what}\n--- kvm host console ---\n{}",
                crate::vm::tail(&qemu.output())
            )
        };
        // QEMU creates the tap; give this side its address once it exists.
        while !Path::new(&format!("/sys/class/net/{tap}")).exists() {
            if let Some(st) = qemu.try_wait() {
                return Err(fail(
                    &qemu,
                    format!("QEMU exited ({st}) before creating {tap}"),
                ));
            }
            if Instant::now() > deadline {
                return Err(fail(&qemu, format!("no tap device {tap}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &tap])
            .and_then(|_| ip(&["link", "set", &tap, "up"]))
            .map_err(|e| fail(&qemu, e))?;
        drop(net_lock);
        loop {
            let out = qemu.output();
            if out.contains("KVMHOST: ready") {
                break;
            }
            if let Some(l) = out.lines().find(|l| l.contains("KVMHOST: error")) {
                return Err(fail(&qemu, l.trim().to_string()));
            }
            if let Some(st) = qemu.try_wait() {
                return Err(fail(&qemu, format!("QEMU exited ({st}) while booting")));
            }
            if Instant::now() > deadline {
                return Err(fail(&qemu, format!("not ready within {BOOT_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let agent: SocketAddr = format!("{guest_ip}:{AGENT_PORT}")
            .parse()
            .expect("valid address");
        loop {
            match remote::ping(agent) {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(fail(
                        &qemu,
                        format!("agent at {agent} does not answer: {e}"),
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        eprintln!(
            "kvm host {guest_ip} ready in {:.1} s (tap {tap})",
            t0.elapsed().as_secs_f64()
        );
        Ok(KvmHost {
            qemu,
            ip: guest_ip,
            host_ip,
            tap,
            agent,
            next: AtomicU32::new(0),
        })
    }

    /// Whether QEMU still runs.
    pub fn alive(&self) -> bool {
        // try_wait needs &mut; the output pump ends when QEMU does, so ask the OS instead.
        self.qemu
            .local_pid()
            .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists() && !is_zombie(p))
    }

    /// The agent's address.
    pub fn agent(&self) -> SocketAddr {
        self.agent
    }

    /// The kvm host's console so far.
    pub fn console(&self) -> String {
        self.qemu.output()
    }

    /// A number unique within this kvm host.
    pub fn unique(&self) -> u32 {
        self.next.fetch_add(1, Ordering::SeqCst)
    }

    /// Starts `argv` inside the kvm host.
    pub fn spawn(&self, argv: &[String], what: &str) -> Spawned {
        let child = RemoteChild::spawn(self.agent, argv, &[], &[])
            .unwrap_or_else(|e| panic!("start {what} in the kvm host: {e}"));
        Spawned::remote(child, what)
    }

    /// Runs `argv` inside the kvm host to its end, feeding it `stdin`.
    pub fn run(
        &self,
        argv: &[&str],
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<(ExitStatus, String, String), String> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let child = RemoteChild::spawn(self.agent, &argv, &[], stdin)
            .map_err(|e| format!("kvm host agent: {e}"))?;
        let st = child
            .wait_exit(timeout)
            .ok_or_else(|| format!("{argv:?} did not end within {timeout:?} in the kvm host"))?;
        if let Some(f) = child.failure() {
            return Err(format!("{argv:?} in the kvm host: {f}"));
        }
        Ok((st, child.output.stdout(), child.output.stderr()))
    }

    /// Runs a shell command inside; panics with its output unless it succeeds.
    pub fn sh(&self, script: &str, stdin: &[u8]) -> String {
        let (st, out, err) = self
            .run(&["/bin/sh", "-c", script], stdin, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            st.success(),
            "kvm host: `{script}` failed ({st}):\n{out}{err}"
        );
        out
    }

    /// Writes a file inside.
    pub fn put(&self, path: &str, bytes: &[u8]) {
        self.sh(
            &format!("mkdir -p \"$(dirname '{path}')\" && cat > '{path}'"),
            bytes,
        );
    }

    /// Reads a file inside (empty if it does not exist).
    pub fn get(&self, path: &str) -> Vec<u8> {
        self.sh(&format!("cat '{path}' 2>/dev/null || true"), &[])
            .into_bytes()
    }

    /// Copies a local directory's contents to `remote` inside (created).
    pub fn put_dir(&self, local: &Path, remote: &str) {
        let tar = Command::new("tar")
            .arg("-C")
            .arg(local)
            .args(["-cf", "-", "."])
            .output()
            .expect("run tar");
        assert!(tar.status.success(), "tar {}", local.display());
        self.sh(
            &format!("mkdir -p '{remote}' && tar -xf - -C '{remote}'"),
            &tar.stdout,
        );
    }

    /// Where a local file is inside the kvm host: the guest images are packed in; any other file
    /// is copied in.
    pub fn inside(&self, local: &Path) -> String {
        let img = Images::load();
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        for (key, inside) in INSIDE_IMAGES {
            if canon(img.get(key)) == canon(local) {
                return (*inside).to_string();
            }
        }
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        let dest = format!("/tmp/files-{}/{name}", self.unique());
        let bytes = std::fs::read(local)
            .unwrap_or_else(|e| panic!("read {} to copy it in: {e}", local.display()));
        self.put(&dest, &bytes);
        dest
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('Z')))
        .unwrap_or(true)
}
