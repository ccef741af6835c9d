//! A child process of the test — on this machine, or inside a kvm host through its agent — with
//! its output captured, stopped on drop.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::kvmhost::remote::RemoteChild;

/// What a child printed: stdout, stderr, and both in the order they arrived.
#[derive(Clone, Default)]
pub struct Output {
    inner: Arc<Mutex<Bufs>>,
}

#[derive(Default)]
struct Bufs {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    merged: Vec<u8>,
}

impl Output {
    /// Appends to stdout.
    pub fn push_stdout(&self, b: &[u8]) {
        let mut g = self.inner.lock().expect("output lock");
        g.stdout.extend_from_slice(b);
        g.merged.extend_from_slice(b);
    }

    /// Appends to stderr.
    pub fn push_stderr(&self, b: &[u8]) {
        let mut g = self.inner.lock().expect("output lock");
        g.stderr.extend_from_slice(b);
        g.merged.extend_from_slice(b);
    }

    /// Everything on stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.inner.lock().expect("output lock").stdout).into_owned()
    }

    /// Everything on stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.inner.lock().expect("output lock").stderr).into_owned()
    }

    /// Both, interleaved as they arrived.
    pub fn merged(&self) -> String {
        String::from_utf8_lossy(&self.inner.lock().expect("output lock").merged).into_owned()
    }

    /// Copies `src` into stdout (or stderr) on a thread of its own.
    pub fn pump(&self, mut src: impl Read + Send + 'static, stdout: bool) {
        let out = self.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = src.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if stdout {
                    out.push_stdout(&buf[..n]);
                } else {
                    out.push_stderr(&buf[..n]);
                }
            }
        });
    }
}

enum Proc {
    Local(Child),
    Remote(RemoteChild),
}

/// A running child.
pub struct Spawned {
    proc: Proc,
    out: Output,
    what: String,
    exited: Option<ExitStatus>,
}

impl Spawned {
    /// Spawns `cmd` on this machine with stdout and stderr captured.
    pub fn start(mut cmd: Command, what: &str) -> Spawned {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let out = Output::default();
        out.pump(child.stdout.take().expect("stdout"), true);
        out.pump(child.stderr.take().expect("stderr"), false);
        Spawned {
            proc: Proc::Local(child),
            out,
            what: what.to_owned(),
            exited: None,
        }
    }

    /// Wraps a program started inside a kvm host.
    pub fn remote(child: RemoteChild, what: &str) -> Spawned {
        Spawned {
            out: child.output.clone(),
            proc: Proc::Remote(child),
            what: what.to_owned(),
            exited: None,
        }
    }

    /// What it is (for messages).
    pub fn what(&self) -> &str {
        &self.what
    }

    /// Everything it printed so far, stdout and stderr together.
    pub fn output(&self) -> String {
        self.out.merged()
    }

    /// Its stdout so far.
    pub fn stdout(&self) -> String {
        self.out.stdout()
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        self.out.stderr()
    }

    /// Its exit status, if it has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = match &mut self.proc {
                Proc::Local(c) => c.try_wait().ok().flatten(),
                Proc::Remote(r) => r.try_wait(),
            };
        }
        self.exited
    }

    /// Why a remote program could not run (or its kvm host was lost), if so.
    pub fn failure(&self) -> Option<String> {
        match &self.proc {
            Proc::Local(_) => None,
            Proc::Remote(r) => r.failure(),
        }
    }

    /// Its pid on this machine (None inside a kvm host).
    pub fn local_pid(&self) -> Option<u32> {
        match &self.proc {
            Proc::Local(c) => Some(c.id()),
            Proc::Remote(_) => None,
        }
    }

    /// Waits for a line starting with `prefix`; returns the rest of it. Panics if the child exits
    /// first or `timeout` passes.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.output();
            if let Some(rest) = text.lines().find_map(|l| l.strip_prefix(prefix)) {
                return rest.trim().to_owned();
            }
            if let Some(st) = self.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                let text = self.output();
                if let Some(rest) = text.lines().find_map(|l| l.strip_prefix(prefix)) {
                    return rest.trim().to_owned();
                }
                panic!(
                    "{} exited ({st}) before {prefix:?}:{}\n{text}",
                    self.what,
                    self.failure().map(|f| format!(" {f}")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {prefix:?} within {timeout:?}:\n{text}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` (to the process; inside a kvm host, to its process group).
    pub fn signal(&mut self, sig: i32) {
        if self.try_wait().is_some() {
            return;
        }
        match &self.proc {
            // A pid that did not fit would wrap to a negative one: a process group, or all (-1).
            Proc::Local(c) => {
                if let Ok(pid) = libc::pid_t::try_from(c.id()) {
                    // SAFETY: kill(2) on our own child's (positive) pid with a valid signal number.
                    unsafe { libc::kill(pid, sig) };
                }
            }
            Proc::Remote(r) => r.signal(sig),
        }
    }

    /// Kills it with SIGKILL, as a crash would, and waits for it.
    pub fn crash(&mut self) {
        match &mut self.proc {
            Proc::Local(c) => {
                let _ = c.kill();
                if let Ok(st) = c.wait() {
                    self.exited = Some(st);
                }
            }
            Proc::Remote(r) => {
                r.signal(libc::SIGKILL);
                self.exited = r.wait_exit(Duration::from_secs(10));
            }
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for it to exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(st) = self.try_wait() {
            return Some(st);
        }
        self.signal(libc::SIGTERM);
        self.wait_exit(timeout)
    }

    /// Waits for it to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.try_wait() {
                // Let the pumps catch up with the last output.
                std::thread::sleep(Duration::from_millis(100));
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.terminate(Duration::from_secs(5)).is_none() {
            self.crash();
        }
    }
}
