//! An `rdma-bridge serve` child process next to a bdvmm guest, with a PKI and a config made for
//! the test.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdma_bridge::client::Bridge;
use rdma_bridge::tls::{self, Identity};

use crate::child::Spawned;
use crate::site::Site;
use crate::vm::Vm;

/// A monitor entry of the bridge config.
pub struct MonitorSpec {
    /// Name.
    pub name: &'static str,
    /// Readable ranges.
    pub read: &'static [&'static str],
    /// Writable ranges.
    pub write: &'static [&'static str],
    /// May restart the guest.
    pub restart: bool,
    /// May take the pause lock (needed to write: with k = 1 a WRITE needs the lock held, with
    /// k >= 2 a vote needs the permission).
    pub lock: bool,
    /// May read vCPU registers (needed to locate the guest kernel).
    pub regs: bool,
}

/// A PKI and a bridge config in a temp dir.
pub struct BridgeSetup {
    dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    /// Where its copy lives once a bridge was started at a remote site (the audit log is there).
    deployed: Mutex<Option<(Arc<Site>, String)>>,
}

impl BridgeSetup {
    /// One monitor, `mon1`, that reads the Sensor Box and RAM, writes hooks, locks and reads
    /// registers (and restarts the guest if `restart`): what a single bdmon needs.
    pub fn one_monitor(listen: &str, restart: bool) -> Self {
        Self::new(
            listen,
            &[MonitorSpec {
                name: "mon1",
                read: &["sb", "ram"],
                write: &["hooks"],
                restart,
                lock: true,
                regs: true,
            }],
            1,
            1000,
        )
    }

    /// Keys for every monitor, and a config listening on `listen` with `k`-of-n writes.
    pub fn new(listen: &str, monitors: &[MonitorSpec], k: usize, window_ms: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dir.path().join("pki");
        tls::pki_init(&pki, tls::DEFAULT_SERVER_NAME).expect("pki init");
        let mut cfg = format!(
            "listen = \"{listen}\"\naudit_log = \"audit.jsonl\"\n\
             [tls]\nca = \"pki/ca.pem\"\ncert = \"pki/bridge.pem\"\nkey = \"pki/bridge.key\"\n\
             [agreement]\nk = {k}\nwindow_ms = {window_ms}\n"
        );
        let list = |v: &[&str]| {
            v.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for m in monitors {
            tls::pki_issue(&pki, m.name).expect("pki issue");
            cfg.push_str(&format!(
                "[[monitor]]\nname = \"{}\"\ncert = \"pki/{}.pem\"\nread = [{}]\nwrite = [{}]\nrestart = {}\nlock = {}\nregs = {}\n",
                m.name,
                m.name,
                list(m.read),
                list(m.write),
                m.restart,
                m.lock,
                m.regs
            ));
        }
        let config = dir.path().join("bridge.toml");
        std::fs::write(&config, cfg).expect("write config");
        BridgeSetup {
            dir,
            config,
            deployed: Mutex::new(None),
        }
    }

    /// The config file's path at `site` (its directory is copied there once).
    fn config_at(&self, site: &Arc<Site>) -> String {
        if site.kvm().is_none() {
            return self.config.display().to_string();
        }
        let mut d = self.deployed.lock().expect("lock");
        match &*d {
            Some((s, dir)) if Arc::ptr_eq(s, site) => format!("{dir}/bridge.toml"),
            _ => {
                let dir = site.dir(self.dir.path());
                *d = Some((site.clone(), dir.clone()));
                format!("{dir}/bridge.toml")
            }
        }
    }

    /// The PKI directory.
    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// A monitor's identity.
    pub fn id(&self, name: &str) -> Identity {
        Identity::from_pki_dir(&self.pki(), name)
    }

    /// The audit log's events.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let text = match &*self.deployed.lock().expect("lock") {
            Some((site, dir)) => site.read(&format!("{dir}/audit.jsonl")),
            None => std::fs::read(self.dir.path().join("audit.jsonl")).unwrap_or_default(),
        };
        String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Events named `event`.
    pub fn audit_events(&self, event: &str) -> Vec<serde_json::Value> {
        self.audit()
            .into_iter()
            .filter(|e| e["event"] == event)
            .collect()
    }
}

/// The `rdma-bridge` binary, built next to bdvmm.
pub fn bridge_bin() -> PathBuf {
    crate::workspace_bin("rdma-bridge")
}

/// A running `rdma-bridge serve`.
pub struct BridgeProc {
    proc: Spawned,
    /// Where monitors connect.
    pub addr: String,
}

impl BridgeProc {
    /// Starts the bridge for `vm`, where the VM runs (its network namespace or its kvm host),
    /// and waits until it listens.
    pub fn start(vm: &Vm, setup: &BridgeSetup) -> BridgeProc {
        // bdvmm makes its API socket only once it runs: wait until it answers.
        drop(vm.client());
        let site = vm.site();
        let args = vec![
            "serve".to_string(),
            "--config".into(),
            setup.config_at(site),
            "--api".into(),
            vm.site_api().to_string(),
        ];
        let mut proc = site.spawn("rdma-bridge", &args, "rdma-bridge");
        let addr = proc.wait_line("rdma-bridge: listening on ", Duration::from_secs(60));
        BridgeProc { proc, addr }
    }

    /// Starts `rdma-bridge serve --dump` for a memory image whose backdoor range is `backdoor`.
    pub fn start_dump(config: &Path, dump: &Path, backdoor: (u64, u64)) -> BridgeProc {
        let mut cmd = std::process::Command::new(bridge_bin());
        cmd.args(["serve", "--config"])
            .arg(config)
            .arg("--dump")
            .arg(dump)
            .arg("--backdoor")
            .arg(format!("{:#x}+{:#x}", backdoor.0, backdoor.1));
        let mut proc = Spawned::start(cmd, "rdma-bridge --dump");
        let addr = proc.wait_line("rdma-bridge: listening on ", Duration::from_secs(30));
        BridgeProc { proc, addr }
    }

    /// Connects as `id`.
    pub fn connect(&self, id: &Identity) -> Bridge {
        Bridge::connect(self.addr.as_str(), id)
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", self.addr, self.output()))
    }

    /// Everything it printed.
    pub fn output(&self) -> String {
        self.proc.output()
    }

    /// Kills it with SIGKILL, as a crash would.
    pub fn crash(&mut self) {
        self.proc.crash()
    }

    /// Waits for it to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.proc.wait_exit(timeout)
    }
}
