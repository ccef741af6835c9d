//! The guest's serial console: where its bytes go and what bdvmm learns from them.
//!
//! Both engines feed the bytes the guest writes to COM1 into one [`Console`]. It copies them to
//! stdout and/or a log file and watches whole lines for a guest kernel panic, so that a panicking
//! guest ends bdvmm with a non-zero exit and a one-line reason whatever the guest's `panic=` setting.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Longest line we keep for inspection; longer lines are cut (the bytes still flow through).
const MAX_LINE: usize = 4096;

/// What the console has seen that matters to the VMM.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConsoleFindings {
    /// The first line of a kernel panic, once seen.
    pub panic: Option<String>,
    /// The panic report is complete (its `---[ end Kernel panic` line was seen).
    pub panic_complete: bool,
}

struct Inner {
    stdout: bool,
    log: Option<File>,
    line: Vec<u8>,
    findings: ConsoleFindings,
}

/// A shareable console sink (cheap to clone).
#[derive(Clone)]
pub struct Console {
    inner: Arc<Mutex<Inner>>,
    /// Signalled when `findings` changes, to wake the event loop.
    pub event: Arc<EventFd>,
}

impl Console {
    /// A console writing to stdout (if `stdout`) and to `log` (if given).
    pub fn new(stdout: bool, log: Option<File>) -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                stdout,
                log,
                line: Vec::with_capacity(256),
                findings: ConsoleFindings::default(),
            })),
            event: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// What has been found so far.
    pub fn findings(&self) -> ConsoleFindings {
        self.lock().findings.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave it in a state worse than a lost line.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Feeds bytes written by the guest.
    pub fn feed(&self, bytes: &[u8]) {
        let mut inner = self.lock();
        if inner.stdout {
            let mut out = std::io::stdout().lock();
            // The console is best effort: a closed stdout must not stop the guest.
            let _ = out.write_all(bytes);
            let _ = out.flush();
        }
        if let Some(log) = inner.log.as_mut() {
            let _ = log.write_all(bytes);
        }
        let mut changed = false;
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&inner.line).trim_end().to_string();
                inner.line.clear();
                changed |= inspect_line(&line, &mut inner.findings);
            } else if inner.line.len() < MAX_LINE {
                inner.line.push(b);
            }
        }
        drop(inner);
        if changed {
            let _ = self.event.write(1);
        }
    }
}

/// Updates `findings` from one console line; returns whether anything changed.
fn inspect_line(line: &str, findings: &mut ConsoleFindings) -> bool {
    if line.contains("---[ end Kernel panic") {
        let first = findings.panic.is_none();
        if first {
            findings.panic = Some(panic_reason(line));
        }
        findings.panic_complete = true;
        return true;
    }
    if findings.panic.is_none() && line.contains("Kernel panic - not syncing") {
        findings.panic = Some(panic_reason(line));
        return true;
    }
    false
}

fn panic_reason(line: &str) -> String {
    let start = line.find("Kernel panic").unwrap_or(0);
    line[start..].trim_end_matches(" ]---").to_string()
}

/// A `Write` adapter so devices (vm-superio's serial) can write into the console.
pub struct ConsoleWriter(pub Console);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.feed(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_panic_across_chunk_boundaries() {
        let c = Console::new(false, None).unwrap();
        c.feed(b"[    1.0] Kernel pa");
        assert_eq!(c.findings().panic, None);
        c.feed(b"nic - not syncing: Attempted to kill init! exitcode=0x00000000\r\n");
        let f = c.findings();
        assert_eq!(
            f.panic.as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000")
        );
        assert!(!f.panic_complete);
        c.feed(b"---[ end Kernel panic - not syncing: Attempted to kill init! ]---\n");
        assert!(c.findings().panic_complete);
    }

    #[test]
    fn ordinary_lines_are_not_panics() {
        let c = Console::new(false, None).unwrap();
        c.feed(b"BACKDOORS: ready\nsome panic=-1 text\n");
        assert_eq!(c.findings(), ConsoleFindings::default());
    }
}
