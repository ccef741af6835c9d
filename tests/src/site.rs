//! Where a test's target side runs — bdvmm, its guest and its bridge: on this machine, in a
//! network namespace of its own (tcg engine), or inside a kvm host (kvm engine). The monitor side
//! (the test process, bdmon) always runs on this machine and reaches a remote site's bridge over
//! a real network path (a veth pair or a tap device).

use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use crate::child::Spawned;
use crate::kvmhost::{KvmHost, KvmHostOptions};
use crate::netns::NetNs;

/// bdvmm's two engines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// A QEMU-TCG child sharing bdvmm's memfd; runs on this machine.
    Tcg,
    /// rust-vmm on KVM; runs inside a kvm host.
    Kvm,
}

impl Engine {
    /// The per-guest bdmon settings (TOML lines for a `[[guest]]` table) that a test guest on
    /// this engine needs here. Nested inside the kvm host a bridge round trip is ~1 ms, not
    /// ~20 µs, and a neighbouring test's kvm host takes half the CPU: walking a fork bomb's
    /// 300-900 task_structs, or a failed front end's task list without the lock, can outlast
    /// the default 1 s walk, and a stock guest's repair (direct writes, about three round trips
    /// per victim) the default 2 s lease. The lease still bounds the pause; the budget allows
    /// those longer pauses (nested times are not hardware times). Nothing on tcg.
    pub fn bdmon_guest_limits(self) -> &'static str {
        match self {
            Engine::Kvm => "lease_ms = 10000\nwalk_ms = 8000\npause_budget_percent = 25\n",
            Engine::Tcg => "",
        }
    }

    /// The engine of an `--engine` name ("tcg", "kvm").
    pub fn parse(name: &str) -> Option<Engine> {
        match name {
            "tcg" => Some(Engine::Tcg),
            "kvm" => Some(Engine::Kvm),
            _ => None,
        }
    }

    /// Its `--engine` name.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Tcg => "tcg",
            Engine::Kvm => "kvm",
        }
    }
}

/// A place where target-side programs run.
pub enum Site {
    /// This machine, this network namespace.
    Local,
    /// A network namespace joined to this one by a veth pair.
    Netns(NetNs),
    /// A kvm host reached over a tap device.
    Kvm(KvmHost),
}

/// The first port handed out by [`Site::listen_addr`].
const FIRST_PORT: u16 = 7070;
static NEXT_PORT: AtomicU16 = AtomicU16::new(FIRST_PORT);

impl Site {
    /// This machine.
    pub fn local() -> Arc<Site> {
        Arc::new(Site::Local)
    }

    /// A fresh network namespace.
    pub fn netns() -> Arc<Site> {
        Arc::new(Site::Netns(NetNs::new().expect("network namespace")))
    }

    /// A freshly booted kvm host.
    pub fn kvm_host() -> Arc<Site> {
        Arc::new(Site::Kvm(
            KvmHost::start(&KvmHostOptions::default()).unwrap_or_else(|e| panic!("{e}")),
        ))
    }

    /// A freshly booted kvm host with `disks` as its `/dev/vda`, `/dev/vdb`, … (copy-on-write:
    /// the images are never changed).
    pub fn kvm_host_with_disks(disks: &[&Path]) -> Arc<Site> {
        let opts = KvmHostOptions {
            disks: disks.iter().map(|d| d.to_path_buf()).collect(),
            ..KvmHostOptions::default()
        };
        Arc::new(Site::Kvm(
            KvmHost::start(&opts).unwrap_or_else(|e| panic!("{e}")),
        ))
    }

    /// A host of its own for a guest on `engine`: a network namespace (tcg) or a kvm host (kvm).
    pub fn remote_host(engine: Engine) -> Arc<Site> {
        match engine {
            Engine::Tcg => Site::netns(),
            Engine::Kvm => Site::kvm_host(),
        }
    }

    /// The default site for a guest on `engine`: this machine (tcg) or a kvm host (kvm).
    pub fn for_engine(engine: Engine) -> Arc<Site> {
        match engine {
            Engine::Tcg => Site::local(),
            Engine::Kvm => Site::kvm_host(),
        }
    }

    /// The kvm host, if this is one.
    pub fn kvm(&self) -> Option<&KvmHost> {
        match self {
            Site::Kvm(h) => Some(h),
            _ => None,
        }
    }

    /// The address that programs here listen on and monitors connect to.
    pub fn ip(&self) -> String {
        match self {
            Site::Local => "127.0.0.1".into(),
            Site::Netns(ns) => ns.ns_ip.clone(),
            Site::Kvm(h) => h.ip.clone(),
        }
    }

    /// `ip:port` for a new listener: on this machine port 0 (the kernel picks; the bridge says
    /// which), elsewhere a port no other listener of this test process was given on that host.
    pub fn listen_addr(&self) -> String {
        match self {
            Site::Local => "127.0.0.1:0".into(),
            _ => format!("{}:{}", self.ip(), NEXT_PORT.fetch_add(1, Ordering::SeqCst)),
        }
    }

    /// The path of this workspace's binary `name` as seen here.
    pub fn bin(&self, name: &str) -> String {
        match self {
            Site::Kvm(_) => format!("/opt/bd/bin/{name}"),
            _ => crate::workspace_bin(name).display().to_string(),
        }
    }

    /// A local file as seen here (copied into a kvm host unless it is one of the packed images).
    pub fn path(&self, local: &Path) -> String {
        match self {
            Site::Kvm(h) => h.inside(local),
            _ => local.display().to_string(),
        }
    }

    /// A local directory's contents as seen here (copied into a kvm host, to a fresh directory).
    pub fn dir(&self, local: &Path) -> String {
        match self {
            Site::Kvm(h) => {
                let remote = format!("/tmp/dir-{}", h.unique());
                h.put_dir(local, &remote);
                remote
            }
            _ => local.display().to_string(),
        }
    }

    /// A fresh scratch directory here, for sockets and logs; `local` is used on this machine.
    pub fn scratch(&self, local: &Path) -> String {
        match self {
            Site::Kvm(h) => {
                let remote = format!("/tmp/scratch-{}", h.unique());
                h.sh(&format!("mkdir -p {remote}"), &[]);
                remote
            }
            _ => local.display().to_string(),
        }
    }

    /// Reads a file here (empty if missing).
    pub fn read(&self, path: &str) -> Vec<u8> {
        match self {
            Site::Kvm(h) => h.get(path),
            _ => std::fs::read(path).unwrap_or_default(),
        }
    }

    /// Starts workspace binary `name` with `args` here.
    pub fn spawn(&self, name: &str, args: &[String], what: &str) -> Spawned {
        let bin = self.bin(name);
        match self {
            Site::Local => {
                let mut c = std::process::Command::new(&bin);
                c.args(args);
                Spawned::start(c, what)
            }
            Site::Netns(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", &ns.name, &bin]).args(args);
                Spawned::start(c, what)
            }
            Site::Kvm(h) => {
                let mut argv = vec![bin];
                argv.extend(args.iter().cloned());
                h.spawn(&argv, what)
            }
        }
    }

    /// What to show when a test fails: the kvm host's console tail (nothing elsewhere).
    pub fn diagnostics(&self) -> String {
        match self {
            Site::Kvm(h) => format!(
                "\n--- kvm host {} console ---\n{}",
                h.ip,
                crate::vm::tail(&h.console())
            ),
            _ => String::new(),
        }
    }
}
