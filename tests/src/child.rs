//! A child process of the test with its output captured line by line, stopped on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running child.
pub struct Spawned {
    child: Child,
    out: Arc<Mutex<String>>,
    what: String,
}

impl Spawned {
    /// Spawns `cmd` with stdout and stderr captured together.
    pub fn start(mut cmd: Command, what: &str) -> Spawned {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let out = Arc::new(Mutex::new(String::new()));
        for src in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(src).lines().map_while(Result::ok) {
                    let mut o = out.lock().expect("output lock");
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        Spawned {
            child,
            out,
            what: what.to_owned(),
        }
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.out.lock().expect("output lock").clone()
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
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{} exited ({st}) before {prefix:?}:\n{text}", self.what);
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {prefix:?} within {timeout:?}:\n{text}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it with SIGKILL, as a crash would.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `timeout` for it to exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Some(st);
        }
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.wait_exit(timeout)
    }

    /// Waits for it to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.terminate(Duration::from_secs(3)).is_none() {
            self.crash();
        }
    }
}
