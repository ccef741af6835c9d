//! The tcg engine: a `qemu-system-x86_64 -accel tcg` child whose RAM *is* bdvmm's memfd.
//!
//! QEMU inherits the memfd and maps it through `memory-backend-file,mem-path=/proc/self/fd/N,
//! share=on`, so every byte the guest writes is immediately visible in bdvmm's (and any API
//! client's) mapping, and the reverse. The machine is `pc` with `max-ram-below-4g=3G`, which gives
//! the same guest-physical layout as [`crate::layout`]; the backdoor range is reserved by the
//! `memmap=` parameter that bdvmm appends to the command line for both engines. QEMU starts with
//! its vCPUs stopped (`-S`) and is driven over QMP on a private Unix socket: `cont`, `stop` (which
//! returns only once every vCPU thread has stopped), `info registers -a`, `quit`. Its serial port
//! is its stdout, which bdvmm reads into the shared [`Console`]. `-no-reboot` turns a guest
//! reboot into a QEMU exit, so a guest never restarts behind bdvmm's back.

mod qmp;
mod regs;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use self::qmp::Qmp;
use super::{Engine, EngineError, OnReset, Pausable, Ready, VcpuRegs, VmExit};
use crate::console::Console;
use crate::devices::bus::DiskSpec;
use crate::devices::tap::NetSpec;
use crate::memory::GuestRam;

/// How long QEMU may take to bring up QMP.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a QMP command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of QEMU's stderr we keep for error messages.
const STDERR_KEEP: usize = 4096;

/// Errors of the tcg engine.
#[derive(Debug, thiserror::Error)]
pub enum TcgError {
    /// No QEMU binary.
    #[error("{0} not found; install Debian package qemu-system-x86 or pass --qemu <path>")]
    NoQemu(String),
    /// Starting QEMU failed.
    #[error("cannot start {0}: {1}")]
    Spawn(String, std::io::Error),
    /// QEMU died during start-up or a command.
    #[error("QEMU died: {0}")]
    QemuDied(String),
    /// A QMP problem.
    #[error("{0}")]
    Qmp(String),
    /// Local set-up (runtime dir, pipes).
    #[error("tcg engine set-up failed: {0}")]
    Setup(std::io::Error),
}

/// What the tcg engine needs to start QEMU.
pub struct TcgSpec<'a> {
    /// QEMU binary (a path, or a name looked up in PATH).
    pub qemu: &'a str,
    /// Kernel image (bzImage or vmlinux; QEMU loads either).
    pub kernel: &'a Path,
    /// Optional initramfs.
    pub initrd: Option<&'a Path>,
    /// The full command line.
    pub cmdline: &'a str,
    /// vCPUs.
    pub vcpus: u8,
    /// What a guest reboot does.
    pub on_reset: OnReset,
    /// Disks, in order (the first is `/dev/vda`): QEMU's virtio-blk-pci on each raw image.
    pub disks: &'a [DiskSpec],
    /// Network devices, in order: QEMU's virtio-net-pci on each existing tap.
    pub nets: &'a [NetSpec],
}

/// QEMU's `-netdev` and `-device` arguments for `nets`: each existing tap (QEMU runs no
/// scripts) behind a virtio-net-pci with the spec's MAC. Tap names cannot hold commas.
fn net_args(nets: &[NetSpec]) -> Vec<OsString> {
    let mut args = Vec::new();
    for (i, net) in nets.iter().enumerate() {
        args.extend([
            OsString::from("-netdev"),
            OsString::from(format!(
                "tap,id=net{i},ifname={},script=no,downscript=no",
                net.tap
            )),
            OsString::from("-device"),
            OsString::from(format!("virtio-net-pci,netdev=net{i},mac={}", net.mac)),
        ]);
    }
    args
}

/// QEMU's `-drive` and `-device` arguments for `disks`: raw images on virtio-blk-pci, QEMU's own
/// image locking, its default write-back cache (which honours the guest's flushes). A comma in a
/// path is doubled, as QEMU's option syntax wants.
fn disk_args(disks: &[DiskSpec]) -> Vec<OsString> {
    let mut args = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        let mut path = Vec::new();
        for &b in disk.path.as_os_str().as_bytes() {
            path.push(b);
            if b == b',' {
                path.push(b',');
            }
        }
        let mut drive = OsString::from("file=");
        drive.push(OsString::from_vec(path));
        drive.push(format!(",format=raw,if=none,id=disk{i}"));
        if disk.read_only {
            drive.push(",readonly=on");
        }
        args.extend([OsString::from("-drive"), drive, OsString::from("-device")]);
        args.push(OsString::from(format!("virtio-blk-pci,drive=disk{i}")));
    }
    args
}

/// Finds `name` in PATH (or checks it, if it contains a slash).
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        p.metadata()
            .map(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
            .unwrap_or(false)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_exec(&p).then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| is_exec(p))
    })
}

/// The tcg engine.
pub struct TcgEngine {
    child: Child,
    pidfd: OwnedFd,
    qmp: Qmp,
    stdout: Option<File>,
    stderr: Option<File>,
    stdin: Option<File>,
    stderr_tail: VecDeque<u8>,
    console: Console,
    vcpus: u8,
    runtime_dir: PathBuf,
    exited: Option<ExitStatus>,
    /// QMP events read while waiting for something else, for the exit-reason logic.
    pending_events: Vec<serde_json::Value>,
    /// What a guest reboot does.
    on_reset: OnReset,
}

/// Longest a requested reset waits for the firmware's own reset before guest reboots end the VM
/// again.
const RESET_SETTLE: Duration = Duration::from_secs(3);

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a valid fd owned by the caller.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn make_runtime_dir() -> std::io::Result<PathBuf> {
    let mut template = std::env::temp_dir()
        .join(format!("bdvmm-{}-XXXXXX", std::process::id()))
        .into_os_string()
        .into_encoded_bytes();
    template.push(0);
    // SAFETY: `template` is a writable NUL-terminated buffer ending in XXXXXX, as mkdtemp needs.
    let p = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    template.pop();
    // SAFETY: mkdtemp only replaced the Xs with ASCII characters.
    Ok(PathBuf::from(unsafe {
        std::ffi::OsString::from_encoded_bytes_unchecked(template)
    }))
}

impl TcgEngine {
    /// Starts QEMU (vCPUs stopped) on `ram`'s memfd and connects QMP.
    pub fn new(ram: &GuestRam, spec: &TcgSpec, console: Console) -> Result<Self, TcgError> {
        let qemu = find_binary(spec.qemu).ok_or_else(|| TcgError::NoQemu(spec.qemu.to_string()))?;
        let runtime_dir = make_runtime_dir().map_err(TcgError::Setup)?;
        let qmp_path = runtime_dir.join("qmp.sock");
        let memfd = ram.file.as_raw_fd();
        let total = ram.layout.total;

        let mut cmd = Command::new(&qemu);
        cmd.args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-accel", "tcg,thread=multi"])
            // QEMU's multi-threaded TCG (7.2, Debian 12) corrupts guest state on a CMPXCHG16B
            // with a segment prefix: Linux 6.12's SLUB per-CPU fast path double-faults in most
            // boots with 2 vCPUs. Without CX16 the kernel takes its fallback path; 4 of 4 boots
            // then succeeded where 1 of 3 did before.
            .args(["-cpu", "qemu64,-cx16"])
            .args(["-machine", "pc,memory-backend=ram,max-ram-below-4g=3G"])
            .args(["-m", &format!("{}M", total >> 20)])
            .args([
                "-object",
                &format!(
                    "memory-backend-file,id=ram,mem-path=/proc/self/fd/{memfd},size={total},share=on"
                ),
            ])
            .args(["-smp", &spec.vcpus.to_string()])
            .args(["-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con"])
            .arg("-kernel")
            .arg(spec.kernel)
            .args(["-append", spec.cmdline])
            .args(["-no-reboot", "-S"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(initrd) = spec.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        cmd.args(disk_args(spec.disks));
        cmd.args(net_args(spec.nets));
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (fcntl, prctl).
        unsafe {
            cmd.pre_exec(move || {
                // The memfd must survive exec in the child (it is CLOEXEC in bdvmm).
                let flags = libc::fcntl(memfd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(memfd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // If bdvmm dies, QEMU dies with it: nothing may keep a guest alive unsupervised.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| TcgError::Spawn(qemu.display().to_string(), e))?;
        // SAFETY: pidfd_open with a valid pid of our own child and no flags.
        let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id(), 0) };
        // A file descriptor, or -1 and errno.
        let Some(pidfd) = RawFd::try_from(ret).ok().filter(|fd| *fd >= 0) else {
            let e = std::io::Error::last_os_error();
            let _ = child.kill();
            let _ = child.wait();
            return Err(TcgError::Setup(e));
        };
        // SAFETY: the fd was just returned by pidfd_open and is owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let stdout = child.stdout.take().map(|s| File::from(OwnedFd::from(s)));
        let stderr = child.stderr.take().map(|s| File::from(OwnedFd::from(s)));
        let stdin = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
        for f in [&stdout, &stderr, &stdin].into_iter().flatten() {
            set_nonblocking(f.as_raw_fd()).map_err(TcgError::Setup)?;
        }
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let qmp = Qmp::connect(&qmp_path, deadline, || matches!(child.try_wait(), Ok(None)));
        let mut engine_stderr = VecDeque::new();
        let qmp = match qmp {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                if let Some(mut s) = stderr {
                    let _ = set_blocking_read_all(&mut s, &mut engine_stderr);
                }
                let _ = std::fs::remove_dir_all(&runtime_dir);
                let tail = last_line(&engine_stderr);
                return Err(match tail {
                    Some(t) => TcgError::QemuDied(format!("{e}; QEMU said: {t}")),
                    None => e,
                });
            }
        };
        let mut engine = Self {
            child,
            pidfd,
            qmp,
            stdout,
            stderr,
            stdin,
            stderr_tail: engine_stderr,
            console,
            vcpus: spec.vcpus,
            runtime_dir,
            exited: None,
            pending_events: Vec::new(),
            on_reset: spec.on_reset,
        };
        engine.qmp.set_timeout(COMMAND_TIMEOUT);
        if engine.on_reset == OnReset::Restart {
            // `-no-reboot` made a guest reboot end QEMU; from now on it resets the machine.
            engine
                .qmp
                .execute("set-action", Some(serde_json::json!({"reboot": "reset"})))
                .map_err(|e| TcgError::Qmp(format!("cannot make guest reboots restart: {e}")))?;
        }
        Ok(engine)
    }

    /// Copies whatever QEMU wrote to stdout into the console; false at end of file.
    fn pump_stdout(&mut self) -> bool {
        let Some(out) = self.stdout.as_mut() else {
            return false;
        };
        let mut buf = [0u8; 16384];
        loop {
            match out.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => self.console.feed(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Keeps the tail of QEMU's stderr; false at end of file.
    fn pump_stderr(&mut self) -> bool {
        let Some(err) = self.stderr.as_mut() else {
            return false;
        };
        let mut buf = [0u8; 4096];
        loop {
            match err.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => {
                    tracing::debug!("qemu: {}", String::from_utf8_lossy(&buf[..n]).trim_end());
                    push_tail(&mut self.stderr_tail, &buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// QEMU has exited: collect its last words and say how the VM ended.
    fn reap(&mut self) -> VmExit {
        let status = match self.exited {
            Some(s) => s,
            None => match self.child.wait() {
                Ok(s) => s,
                Err(e) => return VmExit::Failed(format!("cannot wait for QEMU: {e}")),
            },
        };
        self.exited = Some(status);
        // QEMU is gone, so its pipes end: drain them completely.
        if let Some(mut out) = self.stdout.take() {
            let mut rest = VecDeque::new();
            let _ = set_blocking_read_all(&mut out, &mut rest);
            let rest: Vec<u8> = rest.into_iter().collect();
            self.console.feed(&rest);
        }
        if let Some(mut err) = self.stderr.take() {
            let _ = set_blocking_read_all(&mut err, &mut self.stderr_tail);
        }
        let mut events = std::mem::take(&mut self.pending_events);
        events.extend(self.qmp.drain_events());
        let shutdown_reason = events
            .iter()
            .filter(|e| e["event"] == "SHUTDOWN")
            .filter_map(|e| e["data"]["reason"].as_str())
            .next_back()
            .map(str::to_string);
        let said = last_line(&self.stderr_tail)
            .map(|l| format!(": {l}"))
            .unwrap_or_default();
        match (status.code(), status.signal()) {
            (Some(0), _) => VmExit::Shutdown(match shutdown_reason.as_deref() {
                Some("guest-shutdown") => "guest powered off".into(),
                Some("guest-reset") => {
                    "guest reset (bdvmm treats a guest reboot as shutdown)".into()
                }
                Some(other) => format!("QEMU shut down ({other})"),
                None => "QEMU exited".into(),
            }),
            (Some(code), _) => VmExit::Failed(format!("QEMU exited with status {code}{said}")),
            (None, Some(sig)) => VmExit::Failed(format!("QEMU crashed (signal {sig}){said}")),
            (None, None) => VmExit::Failed(format!("QEMU ended: {status}")),
        }
    }

    fn qemu_alive(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(s)) => {
                self.exited = Some(s);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    fn command(&mut self, command: &str) -> Result<(), EngineError> {
        if !self.qemu_alive() {
            return Err(EngineError::Stopped);
        }
        self.qmp.execute(command, None)?;
        Ok(())
    }
}

fn push_tail(tail: &mut VecDeque<u8>, bytes: &[u8]) {
    tail.extend(bytes);
    while tail.len() > STDERR_KEEP {
        tail.pop_front();
    }
}

fn last_line(tail: &VecDeque<u8>) -> Option<String> {
    let bytes: Vec<u8> = tail.iter().copied().collect();
    String::from_utf8_lossy(&bytes)
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(str::to_string)
}

/// Reads `f` to its end (it must be a pipe whose writer has exited), keeping the tail.
fn set_blocking_read_all(f: &mut File, into: &mut VecDeque<u8>) -> std::io::Result<()> {
    // SAFETY: fcntl on a valid fd we own.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if flags >= 0 {
        // SAFETY: as above.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) };
    }
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    push_tail(into, &buf);
    Ok(())
}

impl Pausable for TcgEngine {
    type Error = EngineError;

    fn pause(&mut self) -> Result<(), EngineError> {
        self.command("stop")
    }

    fn resume(&mut self) -> Result<(), EngineError> {
        self.command("cont")
    }
}

impl Engine for TcgEngine {
    fn name(&self) -> &'static str {
        "tcg"
    }

    fn vcpus(&self) -> u8 {
        self.vcpus
    }

    fn regs(&mut self, vcpu: u8) -> Result<VcpuRegs, EngineError> {
        if vcpu >= self.vcpus {
            return Err(EngineError::NoSuchVcpu(vcpu, self.vcpus));
        }
        if !self.qemu_alive() {
            return Err(EngineError::Stopped);
        }
        let text = self.qmp.hmp("info registers -a")?;
        regs::parse(&text, vcpu).ok_or_else(|| {
            TcgError::Qmp(format!(
                "cannot parse QEMU's registers of vCPU {vcpu}: {}",
                text.lines().next().unwrap_or("")
            ))
            .into()
        })
    }

    fn reset(&mut self) -> Result<(), EngineError> {
        if !self.qemu_alive() {
            return Err(EngineError::Stopped);
        }
        // `-no-reboot` turns every reset into an exit; allow this one. The firmware resets the
        // machine once more while it boots (a guest-initiated reset, within tens of ms): keep
        // resets allowed until that one has happened (or RESET_SETTLE has passed), then make a
        // guest reboot end the VM again.
        self.qmp
            .execute("set-action", Some(serde_json::json!({"reboot": "reset"})))?;
        let reset = self.qmp.execute("system_reset", None);
        if reset.is_ok() {
            let _ = self.qmp.execute("cont", None);
            let until = Instant::now() + RESET_SETTLE;
            while Instant::now() < until && self.qemu_alive() {
                let events = self.qmp.drain_events();
                let firmware_reset = events
                    .iter()
                    .any(|e| e["event"] == "RESET" && e["data"]["guest"] == true);
                self.pending_events.extend(events);
                if firmware_reset {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            self.qmp.set_timeout(COMMAND_TIMEOUT);
        }
        let restore = match self.on_reset {
            OnReset::Restart => Ok(()),
            OnReset::Exit => self
                .qmp
                .execute(
                    "set-action",
                    Some(serde_json::json!({"reboot": "shutdown"})),
                )
                .map(|_| ()),
        };
        reset?;
        restore?;
        self.qmp.execute("cont", None)?;
        Ok(())
    }

    fn serial_input(&mut self, bytes: &[u8]) {
        if let Some(stdin) = self.stdin.as_mut() {
            // Non-blocking: if QEMU is not reading, keystrokes are dropped rather than stall us.
            let _ = stdin.write(bytes);
        }
    }

    fn watch_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.pidfd.as_raw_fd()];
        fds.extend(self.stdout.as_ref().map(|f| f.as_raw_fd()));
        fds.extend(self.stderr.as_ref().map(|f| f.as_raw_fd()));
        fds
    }

    fn on_ready(&mut self, fd: RawFd) -> Ready {
        if fd == self.pidfd.as_raw_fd() {
            return Ready::Ended(self.reap());
        }
        let open = if self.stdout.as_ref().is_some_and(|f| f.as_raw_fd() == fd) {
            self.pump_stdout()
        } else if self.stderr.as_ref().is_some_and(|f| f.as_raw_fd() == fd) {
            self.pump_stderr()
        } else {
            true
        };
        if open {
            Ready::Handled
        } else {
            Ready::Unwatch
        }
    }

    fn terminate(&mut self) {
        if self.qemu_alive() {
            self.qmp.set_timeout(Duration::from_secs(2));
            let _ = self.qmp.execute("quit", None);
            let deadline = Instant::now() + Duration::from_secs(3);
            while self.qemu_alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.qemu_alive() {
                let _ = self.child.kill();
            }
        }
        if self.exited.is_none() {
            self.exited = self.child.wait().ok();
        }
        let _ = std::fs::remove_dir_all(&self.runtime_dir);
    }
}

impl Drop for TcgEngine {
    fn drop(&mut self) {
        self.terminate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_become_virtio_blk_pci_drives_with_commas_doubled() {
        let disks = [
            DiskSpec {
                path: PathBuf::from("/images/root.img"),
                read_only: false,
            },
            DiskSpec {
                path: PathBuf::from("/a,b.img"),
                read_only: true,
            },
        ];
        let args: Vec<String> = disk_args(&disks)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "-drive",
                "file=/images/root.img,format=raw,if=none,id=disk0",
                "-device",
                "virtio-blk-pci,drive=disk0",
                "-drive",
                "file=/a,,b.img,format=raw,if=none,id=disk1,readonly=on",
                "-device",
                "virtio-blk-pci,drive=disk1",
            ]
        );
        assert!(disk_args(&[]).is_empty());
    }

    #[test]
    fn nets_become_virtio_net_pci_on_their_taps_without_scripts() {
        let nets: Vec<NetSpec> = ["tap=tap0,mac=02:00:00:00:00:01", "tap=vm1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let args: Vec<String> = net_args(&nets)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let mac1 = nets[1].mac.to_string();
        assert_eq!(
            args,
            [
                "-netdev",
                "tap,id=net0,ifname=tap0,script=no,downscript=no",
                "-device",
                "virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01",
                "-netdev",
                "tap,id=net1,ifname=vm1,script=no,downscript=no",
                "-device",
                &format!("virtio-net-pci,netdev=net1,mac={mac1}"),
            ]
        );
        assert!(net_args(&[]).is_empty());
    }
}
