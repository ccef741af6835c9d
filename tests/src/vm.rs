//! Starting bdvmm as a real child process and watching what it prints.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bdvmm::api::ApiClient;

use bdvmm::api::MemoryReply;
use introspect::mem::MappedMem;

/// A bdvmm child process with its console captured.
pub struct Vm {
    child: Child,
    /// The control socket.
    pub api: PathBuf,
    dir: tempfile::TempDir,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    exited: Option<ExitStatus>,
}

fn pump(mut src: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = src.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line (bdvmm appends its backdoor parameters).
    pub cmdline: String,
    /// "tcg" or "kvm".
    pub engine: String,
    /// MiB of RAM.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// More arguments for `bdvmm run`.
    pub extra: Vec<String>,
    /// Run bdvmm inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
}

impl VmSpec {
    /// A tcg guest with our initramfs running `scenario` (plus more `bd.*` parameters).
    pub fn tcg(kernel: &Path, initrd: &Path, params: &str) -> Self {
        Self {
            kernel: kernel.to_path_buf(),
            initrd: Some(initrd.to_path_buf()),
            cmdline: format!("console=ttyS0 reboot=k panic=-1 {params}"),
            engine: "tcg".into(),
            mem: 512,
            vcpus: 1,
            extra: Vec::new(),
            netns: None,
        }
    }
}

impl Vm {
    /// Starts `bdvmm run` for `spec` with a control socket in a fresh temp dir.
    pub fn start(spec: &VmSpec) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = dir.path().join("api.sock");
        let mut args: Vec<OsString> = vec![
            "run".into(),
            "--kernel".into(),
            spec.kernel.clone().into(),
            "--cmdline".into(),
            spec.cmdline.clone().into(),
            "--engine".into(),
            spec.engine.clone().into(),
            "--mem".into(),
            spec.mem.to_string().into(),
            "--vcpus".into(),
            spec.vcpus.to_string().into(),
            "--api".into(),
            api.clone().into(),
        ];
        if let Some(i) = &spec.initrd {
            args.push("--initrd".into());
            args.push(i.clone().into());
        }
        args.extend(spec.extra.iter().map(OsString::from));
        Self::spawn(args, api, dir, spec.netns.as_deref())
    }

    fn spawn(
        args: Vec<OsString>,
        api: PathBuf,
        dir: tempfile::TempDir,
        netns: Option<&str>,
    ) -> Self {
        let mut child = crate::netns::command(netns, &crate::bdvmm_bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bdvmm");
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        pump(child.stdout.take().unwrap(), out.clone());
        pump(child.stderr.take().unwrap(), err.clone());
        Self {
            child,
            api,
            dir,
            out,
            err,
            exited: None,
        }
    }

    /// The scratch directory of this VM (deleted on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the guest printed so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Everything bdvmm itself printed so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Waits until the console shows `needle`; panics with the console on timeout or early exit.
    pub fn expect(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) {
                return;
            }
            if let Some(st) = self.try_exit() {
                // Let the pumps catch up with the last output.
                std::thread::sleep(Duration::from_millis(200));
                if self.stdout().contains(needle) {
                    return;
                }
                panic!(
                    "bdvmm exited ({st}) before printing {needle:?}\n--- console ---\n{}\n--- bdvmm ---\n{}",
                    tail(&self.stdout()),
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "no {needle:?} within {timeout:?}\n--- console ---\n{}\n--- bdvmm ---\n{}",
                    tail(&self.stdout()),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits for bdvmm to exit by itself; None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.try_exit() {
                std::thread::sleep(Duration::from_millis(100));
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A client on the control socket.
    pub fn client(&self) -> ApiClient {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ApiClient::connect(&self.api) {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// The guest's RAM, mapped (read-write) through the API, and bdvmm's map of it.
    pub fn memory(&self) -> (MappedMem, MemoryReply) {
        let (file, map) = self.client().memory().expect("memory over the API");
        let mem = bdvmm::inspect::map_memory(file, &map).expect("map the memfd");
        (mem, map)
    }

    /// Pauses the guest (with `lease`) and finds its kernel from vCPU 0's CR3 and `syms`; returns
    /// the client that holds the pause (resume it, or drop it to let the lease go).
    pub fn pause_and_locate(
        &self,
        mem: &MappedMem,
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

    /// bdvmm's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Vm {
    /// Asks bdvmm to stop (SIGTERM: it ends its guest and reaps QEMU), and kills it only if it
    /// has not exited within a few seconds.
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// The last 60 lines of a console, for failure messages.
pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Runs `bdvmm` with `args` to completion (for bad-input tests); returns (status, stderr).
pub fn run_to_end(args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut vm = Vm::spawn(
        args.iter().map(OsString::from).collect(),
        dir.path().join("unused.sock"),
        dir,
        None,
    );
    let st = vm
        .wait_exit(timeout)
        .unwrap_or_else(|| panic!("bdvmm {args:?} did not exit within {timeout:?}"));
    (st, vm.stderr())
}
