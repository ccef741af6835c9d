//! The VM config file (`bdvmm run --config vm.toml`): the same settings as the `run` flags, in
//! TOML. A flag given on the command line wins over the file; a list given on the command line
//! (`--disk`, `--net`) replaces the file's list. Relative paths in the file are relative to the file's
//! directory, so a directory holding `vm.toml` and its images can be moved as a whole.
//!
//! ```toml
//! kernel = "bzImage"
//! initrd = "initramfs.cpio.gz"        # optional
//! cmdline = "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw"
//! mem_mib = 512
//! vcpus = 2
//! engine = "kvm"                      # kvm | tcg | auto
//! api = "/run/bdvmm/vm1.sock"         # optional control socket
//! lease_ms = 2000
//! on_reset = "exit"                   # exit | restart
//! on_panic = "exit"                   # exit | keep
//! console_log = "vm1.console"         # optional
//!
//! [[disk]]
//! path = "rootfs.img"
//! read_only = false
//!
//! [[net]]                             # virtio-net on an existing tap (kvm: vhost-net)
//! tap = "tap0"
//! mac = "02:00:00:00:00:01"           # optional; default derived from the tap name
//! ```
//!
//! Unknown keys are refused (a typo must not silently boot a different machine).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::devices::bus::DiskSpec;
use crate::devices::tap::{NetSpec, NetSpecError};
use crate::engine::{EngineKind, OnPanic, OnReset};

/// Largest config file we read.
const MAX_BYTES: u64 = 1 << 20;

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It could not be read.
    #[error("cannot read the VM config {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// It is too large to be a VM config.
    #[error("the VM config {0} is larger than {MAX_BYTES} bytes; is it the right file?")]
    TooLarge(PathBuf),
    /// It is not valid TOML for a VM config.
    #[error("the VM config {0} is not valid: {1}")]
    Parse(PathBuf, SyntaxError),
}

/// Where and why the text of a VM config is not a VM config, on one line (toml's own message
/// spans several).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", where_.as_ref().map(|(l, c, src)| format!("line {l}, column {c} ({src}): ")).unwrap_or_default())]
pub struct SyntaxError {
    /// Line and column (from 1) and the line's text (at most 80 characters), when known.
    pub where_: Option<(usize, usize, String)>,
    /// What is wrong.
    pub message: String,
}

/// One `[[disk]]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The raw image (or block device).
    pub path: PathBuf,
    /// Whether the guest may only read it.
    #[serde(default)]
    pub read_only: bool,
}

/// One `[[net]]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The existing tap.
    pub tap: String,
    /// The guest's MAC address; derived from the tap name when absent.
    pub mac: Option<String>,
}

/// A VM config file: every key optional, as on the command line.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel (bzImage or vmlinux).
    pub kernel: Option<PathBuf>,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line (bdvmm appends its backdoor parameters).
    pub cmdline: Option<String>,
    /// Guest RAM in MiB.
    pub mem_mib: Option<u64>,
    /// vCPUs.
    pub vcpus: Option<u8>,
    /// Engine.
    pub engine: Option<EngineKind>,
    /// Control API socket.
    pub api: Option<PathBuf>,
    /// Default pause lease in milliseconds.
    pub lease_ms: Option<u64>,
    /// What a guest reboot does.
    pub on_reset: Option<OnReset>,
    /// What a guest kernel panic does.
    pub on_panic: Option<OnPanic>,
    /// Copy of the serial console.
    pub console_log: Option<PathBuf>,
    /// Disks, in order: the first is `/dev/vda`.
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
    /// Network devices, in order: the first is the guest's first interface.
    #[serde(default, rename = "net")]
    pub nets: Vec<NetConfig>,
}

impl VmConfig {
    /// Reads and parses `path`, making its relative paths relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let len = std::fs::metadata(path)
            .map_err(|e| ConfigError::Read(path.to_owned(), e))?
            .len();
        if len > MAX_BYTES {
            return Err(ConfigError::TooLarge(path.to_owned()));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        let mut config = Self::parse(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e))?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        config.rebase(base);
        Ok(config)
    }

    /// Parses TOML text (paths left as written).
    pub fn parse(text: &str) -> Result<Self, SyntaxError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let message = e.message().trim().replace('\n', "; ");
            let where_ = e.span().map(|span| {
                let before = text.get(..span.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let start = before.rfind('\n').map_or(0, |i| i + 1);
                let column = before.len() - start + 1;
                let source: String = text[start..]
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .chars()
                    .take(80)
                    .collect();
                (line, column, source)
            });
            SyntaxError { where_, message }
        })
    }

    /// Makes every relative path relative to `base`.
    fn rebase(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for p in [
            self.kernel.as_mut(),
            self.initrd.as_mut(),
            self.api.as_mut(),
            self.console_log.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        for d in &mut self.disks {
            fix(&mut d.path);
        }
    }

    /// The network devices as `--net` values.
    pub fn net_specs(&self) -> Result<Vec<NetSpec>, NetSpecError> {
        self.nets
            .iter()
            .map(|n| NetSpec::new(&n.tap, n.mac.as_deref()))
            .collect()
    }

    /// The disks as `--disk` values.
    pub fn disk_specs(&self) -> Vec<DiskSpec> {
        self.disks
            .iter()
            .map(|d| DiskSpec {
                path: d.path.clone(),
                read_only: d.read_only,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_config_parses_and_relative_paths_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(
            &path,
            r#"
kernel = "bzImage"
initrd = "/abs/initrd"
cmdline = "console=ttyS0 root=/dev/vda rw"
mem_mib = 768
vcpus = 2
engine = "kvm"
api = "vm.sock"
lease_ms = 1500
on_reset = "restart"

[[disk]]
path = "root.img"

[[disk]]
path = "/data.img"
read_only = true

[[net]]
tap = "tap0"

[[net]]
tap = "tap1"
mac = "02:00:00:00:00:07"
"#,
        )
        .unwrap();
        let c = VmConfig::load(&path).unwrap();
        assert_eq!(c.kernel, Some(dir.path().join("bzImage")));
        assert_eq!(c.initrd, Some(PathBuf::from("/abs/initrd")));
        assert_eq!(c.api, Some(dir.path().join("vm.sock")));
        assert_eq!(
            (c.mem_mib, c.vcpus, c.lease_ms),
            (Some(768), Some(2), Some(1500))
        );
        assert_eq!(c.engine, Some(EngineKind::Kvm));
        assert_eq!(c.on_reset, Some(OnReset::Restart));
        assert_eq!(
            c.disk_specs(),
            vec![
                DiskSpec {
                    path: dir.path().join("root.img"),
                    read_only: false
                },
                DiskSpec {
                    path: PathBuf::from("/data.img"),
                    read_only: true
                }
            ]
        );
        let nets = c.net_specs().unwrap();
        assert_eq!(
            nets.iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec![
                "tap=tap0".parse::<NetSpec>().unwrap().to_string(),
                "tap=tap1,mac=02:00:00:00:00:07".to_owned()
            ]
        );
        let bad = VmConfig::parse("[[net]]\ntap = \"tap0\"\nmac = \"01:00:00:00:00:00\"").unwrap();
        assert_eq!(
            bad.net_specs(),
            Err(NetSpecError::BadMac("01:00:00:00:00:00".into()))
        );
        let e = VmConfig::parse("[[net]]\nifname = \"tap0\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ifname"), "{e}");
    }

    #[test]
    fn typos_and_wrong_types_are_refused_with_the_key() {
        let e = VmConfig::parse("kernal = \"x\"").unwrap_err().to_string();
        assert!(e.contains("kernal"), "{e}");
        let e = VmConfig::parse("vcpus = \"two\"").unwrap_err().to_string();
        assert!(e.contains("vcpus"), "{e}");
        let e = VmConfig::parse("[[disk]]\npath = \"a\"\nro = true")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ro"), "{e}");
        let e = VmConfig::parse("engine = \"hyperv\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("engine") || e.contains("hyperv"), "{e}");
        assert_eq!(VmConfig::parse("").unwrap(), VmConfig::default());
    }

    #[test]
    fn unreadable_or_huge_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            VmConfig::load(&dir.path().join("absent.toml")),
            Err(ConfigError::Read(..))
        ));
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; usize::try_from(MAX_BYTES + 1).unwrap()]).unwrap();
        assert!(matches!(
            VmConfig::load(&big),
            Err(ConfigError::TooLarge(_))
        ));
    }
}
