//! A guest of the Debian root filesystem image (`BD_ROOTFS_IMAGE`) booted from its disk, with a
//! network: on the tcg engine bdvmm runs here with a private copy of the image; on the kvm engine
//! it runs inside a fresh kvm host that has the image as its own copy-on-write disk. Either way
//! the guest's services are reachable from this machine at [`RootfsGuest::ip`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::guestnet::{GuestNet, LanPort};
use crate::site::{Engine, Site};
use crate::vm::{Vm, VmSpec};
use crate::Images;

/// A running root filesystem guest.
pub struct RootfsGuest {
    // Field order: bdvmm ends before its tap goes, and both before the scratch directory.
    /// The VM.
    pub vm: Vm,
    /// Its own network (None for a guest on a [`GuestLan`], which the caller keeps).
    pub net: Option<GuestNet>,
    ip: String,
    dir: tempfile::TempDir,
}

/// A guest placed by the caller: on a site it already has, with disks already there, on a port
/// of a [`GuestLan`] (several guests on one kvm host, or on one LAN).
#[derive(Clone)]
pub struct Placed {
    /// The site.
    pub site: Arc<Site>,
    /// Disk paths as bdvmm there sees them, the root file system first (`,ro` suffix allowed).
    pub disks: Vec<String>,
    /// Its LAN port.
    pub port: LanPort,
}

/// How to boot one.
pub struct RootfsSpec {
    /// The engine.
    pub engine: Engine,
    /// Kernel parameters after `root=/dev/vda rw` and the network's `ip=`.
    pub params: String,
    /// More disks after the root filesystem, each `(image, read_only)`: `/dev/vdb`, …
    pub disks: Vec<(PathBuf, bool)>,
    /// More `bdvmm run` arguments.
    pub extra: Vec<String>,
    /// MiB of guest RAM.
    pub mem: u64,
    /// Boot Debian's stock kernel (with its boot initramfs, which loads the virtio modules)
    /// instead of the patched one.
    pub stock: bool,
    /// Give the disks and the network in a `--config` file (`[[disk]]`, `[[net]]`) instead of
    /// `--disk`/`--net` flags.
    pub config_file: bool,
    /// Placed by the caller (then `disks` is ignored).
    pub placed: Option<Placed>,
}

impl RootfsSpec {
    /// The image with `params`, nothing else.
    pub fn new(engine: Engine, params: &str) -> Self {
        Self {
            engine,
            params: params.to_string(),
            disks: Vec::new(),
            extra: Vec::new(),
            mem: 512,
            config_file: false,
            stock: false,
            placed: None,
        }
    }
}

impl RootfsGuest {
    /// Boots it (returns once bdvmm runs; wait for the console lines you need).
    pub fn start(spec: &RootfsSpec) -> RootfsGuest {
        let img = Images::load();
        let rootfs = img.get("BD_ROOTFS_IMAGE");
        let dir = tempfile::tempdir().expect("tempdir");
        let (site, mut disks): (Arc<Site>, Vec<String>) = match (&spec.placed, spec.engine) {
            (Some(p), _) => (p.site.clone(), p.disks.clone()),
            (None, Engine::Tcg) => {
                // A private copy: the guest writes its root file system.
                let copy = dir.path().join("rootfs.img");
                let st = Command::new("cp")
                    .args(["--sparse=always", "--reflink=auto"])
                    .arg(rootfs)
                    .arg(&copy)
                    .status()
                    .expect("cp");
                assert!(st.success(), "cp {} failed", rootfs.display());
                let mut d = vec![copy.display().to_string()];
                d.extend(spec.disks.iter().map(|(p, _)| p.display().to_string()));
                (Site::local(), d)
            }
            (None, Engine::Kvm) => {
                let mut images: Vec<&Path> = vec![rootfs];
                images.extend(spec.disks.iter().map(|(p, _)| p.as_path()));
                let names = (0..images.len())
                    .map(|i| format!("/dev/vd{}", char::from(b'a' + u8::try_from(i).unwrap())))
                    .collect();
                (Site::kvm_host_with_disks(&images), names)
            }
        };
        if spec.placed.is_none() {
            for (d, (_, ro)) in disks.iter_mut().skip(1).zip(&spec.disks) {
                if *ro {
                    d.push_str(",ro");
                }
            }
        }
        let (net, tap, ip, ip_param) = match &spec.placed {
            Some(p) => (
                None,
                p.port.tap.clone(),
                p.port.guest_ip.clone(),
                p.port.ip_param(),
            ),
            None => {
                let net = GuestNet::new(&site);
                let (tap, ip, param) = (net.tap.clone(), net.guest_ip.clone(), net.ip_param());
                (Some(net), tap, ip, param)
            }
        };
        let mut extra = Vec::new();
        if spec.config_file {
            let mut toml = String::new();
            for d in &disks {
                let (path, ro) = match d.strip_suffix(",ro") {
                    Some(p) => (p, true),
                    None => (d.as_str(), false),
                };
                toml.push_str(&format!("[[disk]]\npath = {path:?}\nread_only = {ro}\n\n"));
            }
            toml.push_str(&format!("[[net]]\ntap = {tap:?}\n"));
            let local = dir.path().join("vm.toml");
            std::fs::write(&local, toml).expect("write vm.toml");
            extra.extend(["--config".to_string(), site.path(&local)]);
        } else {
            for d in &disks {
                extra.extend(["--disk".to_string(), d.clone()]);
            }
            extra.extend(["--net".to_string(), format!("tap={tap}")]);
        }
        extra.extend(spec.extra.iter().cloned());
        let (kernel, initrd) = if spec.stock {
            (
                img.get("BD_STOCK_VMLINUZ"),
                Some(img.get("BD_STOCK_BOOT_INITRD").to_path_buf()),
            )
        } else {
            (img.get("BD_KERNEL_BZIMAGE"), None)
        };
        let vm_spec = VmSpec {
            kernel: kernel.to_path_buf(),
            initrd,
            cmdline: format!(
                "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw {} {}",
                ip_param, spec.params
            ),
            engine: spec.engine,
            mem: spec.mem,
            vcpus: 1,
            extra,
            site: Some(site),
        };
        let vm = Vm::start(&vm_spec);
        RootfsGuest { vm, net, ip, dir }
    }

    /// The guest's address.
    pub fn ip(&self) -> &str {
        &self.ip
    }

    /// A scratch directory on this machine that lives as long as the guest.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `redis-cli` from this machine against the guest's redis-server (20 s at most).
    pub fn redis(&self, args: &[&str]) -> String {
        self.redis_with_input(args, &[])
    }

    /// `redis-cli -x` (the last argument from `input`) when `input` is not empty.
    pub fn redis_with_input(&self, args: &[&str], input: &[u8]) -> String {
        let mut child = Command::new("timeout")
            .args(["20", "redis-cli", "-h", self.ip()])
            .args(if input.is_empty() {
                &[][..]
            } else {
                &["-x"][..]
            })
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("redis-cli (apt-get install redis-tools)");
        let mut stdin = child.stdin.take().expect("stdin");
        // A server that went away closes early; the output says so.
        let _ = stdin.write_all(input);
        drop(stdin);
        let out = child.wait_with_output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
            + String::from_utf8_lossy(&out.stderr).trim()
    }

    /// A field of redis's `INFO server` (e.g. `process_id`).
    pub fn redis_info(&self, field: &str) -> Option<String> {
        self.redis(&["info", "server"]).lines().find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
    }
}
