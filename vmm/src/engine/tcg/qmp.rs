//! A small QMP client: JSON lines over a Unix socket, commands answered in order, asynchronous
//! events kept aside until asked for.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::TcgError;

/// Longest QMP line we accept (QEMU's replies to our commands are far shorter).
const MAX_LINE: u64 = 1 << 20;

/// A connected, negotiated QMP session.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to `path`, retrying until `deadline` while `alive()` holds, and negotiates.
    pub fn connect(
        path: &Path,
        deadline: Instant,
        mut alive: impl FnMut() -> bool,
    ) -> Result<Self, TcgError> {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if !alive() {
                        return Err(TcgError::QemuDied(
                            "it exited before its QMP socket came up".into(),
                        ));
                    }
                    if Instant::now() >= deadline {
                        return Err(TcgError::Qmp(format!(
                            "cannot connect to QMP at {}: {e}",
                            path.display()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| TcgError::Qmp(e.to_string()))?;
        let writer = stream
            .try_clone()
            .map_err(|e| TcgError::Qmp(e.to_string()))?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_value()?;
        if greeting.get("QMP").is_none() {
            return Err(TcgError::Qmp(format!(
                "unexpected QMP greeting: {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_value(&mut self) -> Result<Value, TcgError> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_line(&mut line)
            .map_err(|e| TcgError::Qmp(format!("reading QMP: {e}")))?;
        if n == 0 {
            return Err(TcgError::QemuDied("QMP connection closed".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| TcgError::Qmp(format!("bad QMP line {line:?}: {e}")))
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, TcgError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| TcgError::Qmp(e.to_string()))?;
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .map_err(|e| TcgError::Qmp(format!("writing QMP {command}: {e}")))?;
        loop {
            let v = self.read_value()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(TcgError::Qmp(format!("QMP {command} failed: {e}")));
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Runs a human-monitor command and returns its text.
    pub fn hmp(&mut self, command_line: &str) -> Result<String, TcgError> {
        let r = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": command_line })),
        )?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }

    /// Returns the events seen so far plus whatever is already buffered on the socket, waiting at
    /// most 50 ms for more.
    pub fn drain_events(&mut self) -> Vec<Value> {
        let _ = self
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(50)));
        while let Ok(v) = self.read_value() {
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
        std::mem::take(&mut self.events)
    }

    /// Sets how long a command may take before it is abandoned.
    pub fn set_timeout(&mut self, t: Duration) {
        let _ = self.reader.get_ref().set_read_timeout(Some(t));
    }
}
