//! The project's one JSON-lines writer: the bridge's audit log and the monitor's event log are both
//! one JSON object per line, stamped with `ts_ms` (Unix time, milliseconds), appended and flushed
//! as each event happens. A failing disk is reported through `tracing`; it never stops the caller.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(introspect::conv::millis)
        .unwrap_or(0)
}

/// A JSON-lines log shared between threads.
pub struct JsonLines {
    out: Mutex<Box<dyn Write + Send>>,
    what: &'static str,
}

impl JsonLines {
    /// Appends to `path` (created if missing); `what` names the log in error messages.
    pub fn append(path: &Path, what: &'static str) -> std::io::Result<JsonLines> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self::to_writer(Box::new(f), what))
    }

    /// Lines into any writer (standard output, a buffer in tests).
    pub fn to_writer(out: Box<dyn Write + Send>, what: &'static str) -> JsonLines {
        JsonLines {
            out: Mutex::new(out),
            what,
        }
    }

    /// Writes one line: `ts_ms`, then `head`, then the members of `fields` (if it is an object).
    pub fn write(&self, head: &[(&str, Value)], fields: Value) {
        let mut m = Map::new();
        m.insert("ts_ms".into(), now_ms().into());
        for (k, v) in head {
            m.insert((*k).to_owned(), v.clone());
        }
        if let Value::Object(f) = fields {
            m.extend(f);
        }
        let mut line = Value::Object(m).to_string();
        line.push('\n');
        let mut out = match self.out.lock() {
            Ok(o) => o,
            Err(p) => p.into_inner(),
        };
        if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            tracing::error!("{} write failed: {e}", self.what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_object_per_line_with_a_timestamp() {
        let buf = Buf::default();
        let log = JsonLines::to_writer(Box::new(buf.clone()), "test log");
        log.write(&[("event", "a".into())], serde_json::json!({"n": 1}));
        log.write(&[("event", "b".into())], Value::Null);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "a");
        assert_eq!(lines[0]["n"], 1);
        assert!(lines[1]["ts_ms"].as_u64().unwrap() > 1_600_000_000_000);
    }
}
