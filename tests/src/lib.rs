//! Helpers shared by the end-to-end tests and benchmarks: where the guest images are, how to start
//! bdvmm and watch its console, how to map a running guest's memory, and a tiny hand-written guest
//! for the kvm engine.

pub mod bench;
pub mod bridge;
pub mod child;
pub mod failover;
pub mod guestnet;
pub mod kvmhost;
pub mod load;
pub mod netns;
pub mod rootfs;
pub mod rxe;
pub mod service;
pub mod site;
pub mod statebox_image;
pub mod tiny_guest;
pub mod vm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Paths of the images that `images/build.sh` produced (read from its `images.env`).
#[derive(Debug, Clone)]
pub struct Images {
    vars: HashMap<String, PathBuf>,
}

impl Images {
    /// Loads `$BD_IMAGES_ENV`, else `${BACKDOORS_CACHE:-~/.cache/backdoors}/images.env`.
    ///
    /// Panics with instructions if the images were never built: these tests need real guests.
    pub fn load() -> Self {
        let path = Self::env_path();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "guest images not found ({}: {e}); build them with `images/build.sh` (`make test` does)",
                path.display()
            )
        });
        let vars = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), PathBuf::from(v.trim())))
            .collect();
        Self { vars }
    }

    /// Where `images.env` is: `$BD_IMAGES_ENV`, else in the cache root.
    pub fn env_path() -> PathBuf {
        std::env::var_os("BD_IMAGES_ENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache_dir().join("images.env"))
    }

    /// One image path by its variable name, if images.env has it and the file exists (for
    /// optional images, such as the SoftRoCE VM's).
    pub fn opt(&self, key: &str) -> Option<&Path> {
        self.vars
            .get(key)
            .map(PathBuf::as_path)
            .filter(|p| p.exists())
    }

    /// One image path by its variable name (e.g. `BD_KERNEL_BZIMAGE`); panics if missing.
    pub fn get(&self, key: &str) -> &Path {
        let p = self
            .vars
            .get(key)
            .unwrap_or_else(|| panic!("images.env has no {key}; rebuild with images/build.sh"));
        assert!(
            p.exists(),
            "{key}={} does not exist; rebuild with images/build.sh",
            p.display()
        );
        p
    }
}

/// The build cache root.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("BACKDOORS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/backdoors")
        })
}

/// The bdvmm binary: `$BDVMM_BIN`, else next to the test executable's target directory.
pub fn bdvmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BDVMM_BIN") {
        return PathBuf::from(p);
    }
    workspace_bin("bdvmm")
}

/// A binary of this workspace, in the target directory of the test executable.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not built; run `cargo build -p bdvmm -p rdma-bridge` first (`make test` does)",
        bin.display()
    );
    bin
}

/// The physical start of the guest kernel's code, from the `HELLO iomem <start>-<end> Kernel code`
/// line the `hello` scenario prints (the guest's own /proc/iomem; KASLR moves it every boot).
pub fn kernel_code_phys(console: &str) -> u64 {
    console
        .lines()
        .find_map(|l| {
            let rest = l.trim_end_matches('\r').split("HELLO iomem ").nth(1)?;
            let (range, what) = rest.split_once(' ')?;
            (what == "Kernel code")
                .then(|| u64::from_str_radix(range.split('-').next()?, 16).ok())?
        })
        .unwrap_or_else(|| panic!("guest did not print its Kernel code range:\n{console}"))
}

/// What introspection needs to know about one of the built kernels: its BTF, the task layout
/// from it, and its System.map.
pub struct KernelFiles {
    /// The kernel's BTF.
    pub btf: introspect::btf::Btf,
    /// task_struct and friends, from that BTF.
    pub layout: introspect::tasks::TaskLayout,
    /// Link-time symbols.
    pub syms: introspect::kernel::Symbols,
}

impl KernelFiles {
    /// Loads the vmlinux and System.map named by two `images.env` keys.
    pub fn load(img: &Images, vmlinux_key: &str, map_key: &str) -> Self {
        let vmlinux = std::fs::read(img.get(vmlinux_key)).expect("read vmlinux");
        let btf = introspect::btf::Btf::from_elf(&vmlinux).expect("BTF of the vmlinux");
        let layout = introspect::tasks::TaskLayout::from_btf(&btf).expect("task layout");
        let syms = introspect::kernel::Symbols::from_file(img.get(map_key)).expect("System.map");
        Self { btf, layout, syms }
    }

    /// Run-time address of `init_task` for a kernel slid by `loc`.
    pub fn init_task(&self, loc: &introspect::kernel::KernelLocation) -> u64 {
        self.syms.get("init_task").expect("init_task in System.map") + loc.slide
    }
}

/// `bdmon run` with `config` (TOML) written to `dir/bdmon.toml`, once it says it watches.
pub fn start_bdmon(dir: &Path, config: &str) -> child::Spawned {
    let path = dir.join("bdmon.toml");
    std::fs::write(&path, config).expect("write bdmon.toml");
    let mut cmd = std::process::Command::new(workspace_bin("bdmon"));
    cmd.arg("run").arg("--config").arg(&path);
    let mut p = child::Spawned::start(cmd, "bdmon");
    p.wait_line("bdmon: watching", std::time::Duration::from_secs(30));
    p
}

/// bdmon's events in `dir/events.jsonl` (none if the file is not there yet); every line must be
/// JSON.
pub fn bdmon_events(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("events are JSON lines"))
        .collect()
}

/// Also prints the first lines of a panic's message, and where it happened, on stdout.
///
/// A CI summary that must be short keeps a failing test's stdout, which comes first in
/// nextest's report, and may cut its stderr, where the panic and the diagnostics go. The long
/// end-to-end tests call this first so that the reason for a failure survives the cut.
pub fn panic_summary_on_stdout() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(a panic without a message)");
            let head: Vec<&str> = msg.lines().take(4).collect();
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            println!("PANIC at {at}: {}", head.join(" | "));
            default(info);
        }));
    });
}
