//! Starting bdvmm as a real child process — on this machine (tcg) or inside a kvm host (kvm) —
//! and watching what it prints.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdvmm::api::{ApiClient, MemoryReply};
use introspect::mem::{MappedMem, MemError, PhysMem};
use rdma_bridge::client::BridgeMem;

use crate::bridge::{BridgeProc, BridgeSetup, MonitorSpec};
use crate::child::Spawned;
use crate::kvmhost::remote::UnixRelay;
use crate::site::{Engine, Site};

/// A bdvmm child process with its console captured.
pub struct Vm {
    proc: Spawned,
    /// The control socket, usable from this process (for a kvm host: a relay to the real one).
    pub api: PathBuf,
    site_api: String,
    engine: Engine,
    _relay: Option<UnixRelay>,
    dir: tempfile::TempDir,
    // Last: the site (a kvm host) outlives everything running in it.
    site: Arc<Site>,
}

/// What to boot.
#[derive(Clone)]
pub struct VmSpec {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line (bdvmm appends its backdoor parameters).
    pub cmdline: String,
    /// The engine.
    pub engine: Engine,
    /// MiB of RAM.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// More arguments for `bdvmm run` (an `--engine` here replaces the one `engine` gives).
    pub extra: Vec<String>,
    /// Where bdvmm runs; by default this machine (tcg) or a fresh kvm host (kvm).
    pub site: Option<Arc<Site>>,
}

impl VmSpec {
    /// A guest on `engine` with our initramfs running `params` (`bd.scenario=...` and more).
    pub fn on(engine: Engine, kernel: &Path, initrd: &Path, params: &str) -> Self {
        Self {
            kernel: kernel.to_path_buf(),
            initrd: Some(initrd.to_path_buf()),
            cmdline: format!("console=ttyS0 reboot=k panic=-1 {params}"),
            engine,
            mem: 512,
            vcpus: 1,
            extra: Vec::new(),
            site: None,
        }
    }

    /// A tcg guest with our initramfs running `params`.
    pub fn tcg(kernel: &Path, initrd: &Path, params: &str) -> Self {
        Self::on(Engine::Tcg, kernel, initrd, params)
    }
}

impl Vm {
    /// Starts `bdvmm run` for `spec` with a control socket in a fresh directory.
    pub fn start(spec: &VmSpec) -> Self {
        let site = spec
            .site
            .clone()
            .unwrap_or_else(|| Site::for_engine(spec.engine));
        let dir = tempfile::tempdir().expect("tempdir");
        let site_dir = site.scratch(dir.path());
        let site_api = format!("{site_dir}/api.sock");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            site.path(&spec.kernel),
            "--cmdline".into(),
            spec.cmdline.clone(),
            "--mem".into(),
            spec.mem.to_string(),
            "--vcpus".into(),
            spec.vcpus.to_string(),
            "--api".into(),
            site_api.clone(),
        ];
        if let Some(i) = &spec.initrd {
            args.push("--initrd".into());
            args.push(site.path(i));
        }
        if !spec.extra.iter().any(|a| a == "--engine") {
            args.extend(["--engine".into(), spec.engine.name().into()]);
        }
        args.extend(spec.extra.iter().cloned());
        let proc = site.spawn("bdvmm", &args, &format!("bdvmm ({})", spec.engine.name()));
        let (api, relay) = match site.kvm() {
            Some(h) => {
                let local = dir.path().join("api.sock");
                let relay = UnixRelay::start(h.agent(), &site_api, &local)
                    .unwrap_or_else(|e| panic!("relay to the kvm host's bdvmm API: {e}"));
                (local, Some(relay))
            }
            None => (PathBuf::from(&site_api), None),
        };
        Self {
            proc,
            api,
            site_api,
            engine: spec.engine,
            _relay: relay,
            dir,
            site,
        }
    }

    /// Where this VM runs.
    pub fn site(&self) -> &Arc<Site> {
        &self.site
    }

    /// The control socket's path where the VM runs (for programs started there).
    pub fn site_api(&self) -> &str {
        &self.site_api
    }

    /// The engine.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// A local scratch directory of this VM (deleted on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the guest printed so far.
    pub fn stdout(&self) -> String {
        self.proc.stdout()
    }

    /// Everything bdvmm itself printed so far.
    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }

    /// The console tail, bdvmm's own words, where each vCPU is, and, for a kvm host, its
    /// console: for failures.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- console ---\n{}\n--- bdvmm ---\n{}{}{}{}",
            tail(&self.stdout()),
            self.stderr(),
            self.proc
                .failure()
                .map(|f| format!("\n({f})"))
                .unwrap_or_default(),
            self.vcpu_state(),
            self.site.diagnostics()
        )
    }

    /// Status and registers of every vCPU, if bdvmm still answers (never waits long).
    fn vcpu_state(&self) -> String {
        let Ok(mut c) = ApiClient::connect(&self.api) else {
            return String::new();
        };
        let Ok(st) = c.status() else {
            return String::new();
        };
        let mut out = format!(
            "\n--- bdvmm status: {} {} vCPU(s), {}, up {} ms ---",
            st.engine, st.vcpus, st.state, st.uptime_ms
        );
        for v in 0..st.vcpus {
            match c.regs(v) {
                Ok(r) => out.push_str(&format!(
                    "\nvCPU {v}: rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr3 {:#x} cpl {}",
                    r.rip, r.rsp, r.rflags, r.cr0, r.cr3, r.cpl
                )),
                Err(e) => out.push_str(&format!("\nvCPU {v}: {e}")),
            }
        }
        out
    }

    /// Waits until the console shows `needle`; panics with the console on timeout or early exit.
    pub fn expect(&mut self, needle: &str, timeout: Duration) {
        if let Err(why) = self.wait_for(needle, timeout) {
            panic!("{why}");
        }
    }

    /// Waits until the console shows `needle`; on timeout or early exit, says so with the
    /// diagnostics (for callers that add their own, e.g. the monitor's events).
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) {
                return Ok(());
            }
            if let Some(st) = self.proc.try_wait() {
                // Let the pumps catch up with the last output.
                std::thread::sleep(Duration::from_millis(200));
                if self.stdout().contains(needle) {
                    return Ok(());
                }
                return Err(format!(
                    "bdvmm exited ({st}) before printing {needle:?}\n{}",
                    self.diagnostics()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no {needle:?} within {timeout:?}\n{}",
                    self.diagnostics()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the console holds a whole line (ended by a newline) containing `needle`, and
    /// returns it without its line ending; panics like [`Vm::expect`].
    pub fn expect_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            self.expect(needle, deadline.saturating_duration_since(Instant::now()));
            let out = self.stdout();
            let whole = out
                .split_inclusive('\n')
                .find(|l| l.contains(needle) && l.ends_with('\n'));
            if let Some(l) = whole {
                return l.trim_end_matches(['\r', '\n']).to_string();
            }
            if Instant::now() > deadline {
                panic!(
                    "no whole line with {needle:?} within {timeout:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its exit status, if it has ended.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.proc.try_wait()
    }

    /// Waits for bdvmm to exit by itself; None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(timeout)
    }

    /// A client on the control socket, once bdvmm answers on it.
    pub fn client(&self) -> ApiClient {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let err = match ApiClient::connect(&self.api) {
                Ok(mut c) => match c.status() {
                    Ok(_) => return c,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                panic!("bdvmm API: {err}\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The guest's RAM mapped (read-write) through the API's memory hand-off, and bdvmm's map of
    /// it. Only where this process can receive the memfd: on this machine.
    pub fn memory(&self) -> (MappedMem, MemoryReply) {
        assert!(
            self.site.kvm().is_none(),
            "the memfd of a guest inside a kvm host cannot be mapped here; use Vm::guest_mem"
        );
        let (file, map) = self.client().memory().expect("memory over the API");
        let mem = bdvmm::api::map_memory(file, &map).expect("map the memfd");
        (mem, map)
    }

    /// The guest's RAM as this process can reach it: the memfd mapped from bdvmm's hand-off on
    /// this machine, or — for a guest inside a kvm host — through a bridge started next to it
    /// (whose own access is that same hand-off), with read access to everything and write access
    /// to RAM and the repair hooks.
    pub fn guest_mem(&self) -> GuestMem {
        if self.site.kvm().is_none() {
            let (mem, map) = self.memory();
            return GuestMem::Mapped(mem, map.backdoor.gpa, map.backdoor.size, map.size);
        }
        let setup = BridgeSetup::new(
            &self.site.listen_addr(),
            &[MonitorSpec {
                name: "harness",
                read: &["sb", "ram"],
                write: &["ram", "hooks"],
                restart: false,
                lock: true,
                regs: true,
            }],
            1,
            1000,
        );
        let bridge = BridgeProc::start(self, &setup);
        let b = bridge.connect(&setup.id("harness"));
        let (gpa, size) = b.backdoor();
        let mem = BridgeMem::new(b);
        let total = self.client().memory_map_size();
        GuestMem::Remote {
            mem: Box::new(mem),
            backdoor: (gpa, size),
            size: total,
            _bridge: Box::new((bridge, setup)),
            locked: std::cell::Cell::new(false),
        }
    }

    /// Pauses the guest (with `lease`) and finds its kernel from vCPU 0's CR3 and `syms`; returns
    /// the client that holds the pause (resume it, or drop it to let the lease go).
    pub fn pause_and_locate(
        &self,
        mem: &dyn PhysMem,
        syms: &introspect::kernel::Symbols,
        lease: Duration,
    ) -> (ApiClient, introspect::kernel::KernelLocation) {
        let mut c = self.client();
        c.pause(Some(lease)).expect("pause");
        let regs = c.regs(0).expect("regs of vCPU 0");
        let loc =
            introspect::kernel::locate(mem, regs.cr3, regs.cr4, syms).expect("locate the kernel");
        (c, loc)
    }

    /// bdvmm's pid on this machine (None inside a kvm host).
    pub fn local_pid(&self) -> Option<u32> {
        self.proc.local_pid()
    }
}

/// Extension of the API client for the harness.
trait MapSize {
    fn memory_map_size(&mut self) -> u64;
}

impl MapSize for ApiClient {
    /// The guest RAM size from `status`.
    fn memory_map_size(&mut self) -> u64 {
        self.status().expect("status").mem_bytes
    }
}

/// Guest RAM as a test reaches it (see [`Vm::guest_mem`]).
pub enum GuestMem {
    /// The memfd, mapped here: (mapping, backdoor gpa, backdoor size, RAM size).
    Mapped(MappedMem, u64, u64, u64),
    /// Through a bridge next to the VM.
    Remote {
        /// The bridge client.
        mem: Box<BridgeMem>,
        /// The backdoor range.
        backdoor: (u64, u64),
        /// RAM size.
        size: u64,
        /// The bridge process and its PKI, kept alive.
        _bridge: Box<(BridgeProc, BridgeSetup)>,
        /// Whether this session holds the bridge's lock (see [`GuestMem::pause`]).
        locked: std::cell::Cell<bool>,
    },
}

impl GuestMem {
    /// Pauses the guest for writes through this memory: bdvmm's pause over `c` for the mapped
    /// memfd, the bridge's lock for a remote guest (the bridge applies a WRITE only from the
    /// lock's holder). Undo with [`GuestMem::resume`].
    pub fn pause(&self, c: &mut ApiClient, lease: Duration) -> Result<(), String> {
        match self {
            GuestMem::Mapped(..) => c.pause(Some(lease)).map(drop).map_err(|e| e.to_string()),
            GuestMem::Remote { mem, locked, .. } => {
                mem.lock(lease).map_err(|e| e.to_string())?;
                locked.set(true);
                Ok(())
            }
        }
    }

    /// Resumes what [`GuestMem::pause`] paused.
    pub fn resume(&self, c: &mut ApiClient) -> Result<(), String> {
        match self {
            GuestMem::Mapped(..) => c.resume().map(drop).map_err(|e| e.to_string()),
            GuestMem::Remote { mem, locked, .. } => {
                locked.set(false);
                mem.unlock().map_err(|e| e.to_string())
            }
        }
    }

    /// The backdoor range (gpa, size).
    pub fn backdoor(&self) -> (u64, u64) {
        match self {
            GuestMem::Mapped(_, g, s, _) => (*g, *s),
            GuestMem::Remote { backdoor, .. } => *backdoor,
        }
    }

    /// Guest RAM size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            GuestMem::Mapped(_, _, _, n) => *n,
            GuestMem::Remote { size, .. } => *size,
        }
    }

    /// The Sensor Box, read consistently.
    pub fn sensor_box(&self) -> Result<introspect::sensorbox::SensorBox, String> {
        let (gpa, size) = self.backdoor();
        introspect::sensorbox::read(self, gpa, size, 1000).map_err(|e| e.to_string())
    }
}

impl PhysMem for GuestMem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        match self {
            GuestMem::Mapped(m, ..) => m.read(gpa, buf),
            GuestMem::Remote { mem, .. } => mem.read(gpa, buf),
        }
    }

    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), MemError> {
        match self {
            GuestMem::Mapped(m, ..) => m.write(gpa, bytes),
            GuestMem::Remote { mem, locked, .. } if locked.get() => mem.write(gpa, bytes),
            // The bridge applies a WRITE only from the lock's holder: hold it around the write.
            GuestMem::Remote { mem, .. } => {
                mem.lock(Duration::from_secs(2))
                    .map_err(|e| MemError::Remote(format!("lock for a write: {e}")))?;
                let written = mem.write(gpa, bytes);
                let unlocked = mem.unlock();
                written?;
                unlocked.map_err(|e| MemError::Remote(format!("unlock after a write: {e}")))
            }
        }
    }
}

/// The last 60 lines of a console, for failure messages.
pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Runs `bdvmm` with `args` to completion on this machine (for bad-input tests); returns
/// (status, stderr).
pub fn run_to_end(args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    let mut cmd = std::process::Command::new(crate::bdvmm_bin());
    cmd.args(args);
    let mut p = Spawned::start(cmd, "bdvmm");
    let st = p
        .wait_exit(timeout)
        .unwrap_or_else(|| panic!("bdvmm {args:?} did not exit within {timeout:?}"));
    (st, p.stderr())
}
