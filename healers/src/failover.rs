//! Session recovery (the talk's State Box case): when a guest that serves sessions has failed,
//! its sessions move to a standby front end in another guest, without the failed guest's CPU or
//! OS.
//!
//! 1. Take the lock if bdvmm can pause the guest; if it cannot (vCPUs that do not answer), read
//!    without it, trusting only reads that agree ([`Guest::state_boxes`]). A guest whose timer
//!    stopped is read without the lock first (its memory does not change; a pause would only
//!    wait for bdvmm's timeout). Its kernel was located while it was healthy (the dispatcher
//!    does it for every guest with `[guest.failover]`).
//! 2. Read the State Boxes of the configured service's processes through the bridge (READs only,
//!    every box checked against the ABI, torn or hostile ones refused:
//!    [`introspect::statebox`]).
//! 3. Hand them to the standby: `IMPORT <n>` then, per box, `<id> <len>` and the bytes; then
//!    `TAKEOVER`, after which the standby has fenced the old owner at the database, resolved
//!    in-flight requests, taken the service address and serves. Only then is the lock released.
//! 4. Optionally restart the failed guest (`fence = "restart"`).
//!
//! Each step's time goes into one `failover` event.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config::{FailoverConfig, Fence};
use crate::guest::{Guest, GuestError, StateBoxes};
use crate::hm::HealContext;
use introspect::sensorbox::SensorBox;

/// Longest reply line accepted from the standby.
const MAX_REPLY: usize = 4096;

/// Why a failover did not complete.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// Reading the failed guest.
    #[error("reading the failed guest's State Boxes: {0}")]
    Guest(#[from] GuestError),
    /// The standby's address.
    #[error("standby {addr}: cannot resolve: {why}")]
    Address {
        /// As configured.
        addr: String,
        /// Why.
        why: String,
    },
    /// Talking to the standby.
    #[error("standby {addr}: {step}: {source}")]
    Io {
        /// Its address.
        addr: String,
        /// What was being done.
        step: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The standby refused.
    #[error("standby {addr} refused {step}: {reply:?}")]
    Refused {
        /// Its address.
        addr: String,
        /// What.
        step: &'static str,
        /// Its reply line.
        reply: String,
    },
}

/// What a failover did.
#[derive(Debug)]
pub struct Done {
    /// The event's fields.
    pub fields: Value,
}

/// Moves the failed guest's sessions to the standby (see the module's documentation).
pub fn fail_over(
    ctx: &mut HealContext<'_>,
    cfg: &FailoverConfig,
    sb: &SensorBox,
    kernel_stopped: bool,
) -> Result<Done, FailoverError> {
    let t0 = Instant::now();
    // A guest whose timer no longer ticks while bdvmm says it runs does not change its memory:
    // its vCPUs do not run (a hard hang) or its kernel has stopped (a panic). Asking bdvmm to
    // pause vCPUs that do not answer only waits for its timeout: read without the lock, by
    // reads that must agree, and fall back to the lock only if they do not.
    if kernel_stopped {
        match move_sessions(ctx.guest, cfg, t0) {
            Ok(moved) => return Ok(finish(ctx, cfg, moved, false, None, t0)),
            Err(FailoverError::Guest(GuestError::StateBoxesMoving(_))) => {}
            Err(e) => return Err(e),
        }
    }
    // Under the lock if bdvmm can pause the guest, held until the standby serves: the failed
    // front end must not run between the extraction and the standby's fencing of it (a request
    // it took after the extraction would be unknown to the standby, and the client's retry
    // would run twice). A lease that runs out resumes it: the fencing at the database (the
    // standby's first step) still stops it from committing.
    let attempt = ctx.lock(sb).map(|mut held| {
        let r = move_sessions(held.guest, cfg, t0);
        (r, held.release())
    });
    let (moved, locked, lock_note) = match attempt {
        Ok((r, released)) => (r?, true, released.err().map(|e| e.to_string())),
        Err(e) => (
            move_sessions(ctx.guest, cfg, t0)?,
            false,
            Some(e.to_string()),
        ),
    };
    Ok(finish(ctx, cfg, moved, locked, lock_note, t0))
}

/// Step 4 and the event's fields.
fn finish(
    ctx: &mut HealContext<'_>,
    cfg: &FailoverConfig,
    moved: Value,
    locked: bool,
    lock_note: Option<String>,
    t0: Instant,
) -> Done {
    let fence = match cfg.fence {
        Fence::None => None,
        Fence::Restart => Some(match ctx.guest.restart() {
            Ok(()) => "restarted".to_string(),
            Err(e) => format!("restart failed: {e}"),
        }),
    };
    let mut fields = moved;
    if let Some(f) = fields.as_object_mut() {
        f.insert("locked".into(), json!(locked));
        f.insert("lock_note".into(), json!(lock_note));
        f.insert("fence".into(), json!(fence));
        f.insert(
            "total_us".into(),
            json!(crate::events::micros(t0.elapsed())),
        );
    }
    Done { fields }
}

/// Steps 2 and 3: the failed guest's State Boxes to the standby; the event's fields.
fn move_sessions(
    guest: &mut Guest,
    cfg: &FailoverConfig,
    t0: Instant,
) -> Result<Value, FailoverError> {
    let comm = cfg.comm.clone();
    let uid = cfg.uid;
    let select = move |p: &introspect::tasks::Process| {
        comm.as_ref().is_none_or(|c| &p.task.comm == c) && uid.is_none_or(|u| p.task.uid == u)
    };
    let StateBoxes {
        regions,
        refused,
        looked_at,
    } = guest.state_boxes(&select)?;
    let extracted = t0.elapsed();
    let records: Vec<(u64, &[u8])> = regions
        .iter()
        .flat_map(|r| r.boxes.iter().map(|b| (b.id, b.data.as_slice())))
        .collect();
    let bytes: usize = records.iter().map(|(_, d)| d.len()).sum();
    let refused_slots: Vec<Value> = regions
        .iter()
        .flat_map(|r| {
            r.refused
                .iter()
                .map(move |x| json!({"pid": r.pid, "slot": x.slot, "why": x.reason.to_string()}))
        })
        .collect();
    let refused_regions: Vec<String> = refused.iter().map(|e| e.to_string()).collect();
    let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
    let mut standby = Standby::connect(&cfg.backup, timeout)?;
    let imported = standby.import(&records)?;
    let import_done = t0.elapsed();
    let serving = standby.takeover()?;
    let takeover_done = t0.elapsed();
    Ok(json!({
        "standby": cfg.backup, "processes": looked_at, "regions": regions.len(),
        "boxes": records.len(), "bytes": bytes, "refused_slots": refused_slots,
        "refused_regions": refused_regions, "imported": imported, "serving": serving,
        "extract_us": crate::events::micros(extracted),
        "import_us": crate::events::micros(import_done - extracted),
        "takeover_us": crate::events::micros(takeover_done - import_done),
    }))
}

/// A connection to the standby's admin port.
struct Standby {
    addr: String,
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Standby {
    fn connect(addr: &str, timeout: Duration) -> Result<Standby, FailoverError> {
        let sa: SocketAddr = addr
            .to_socket_addrs()
            .map_err(|e| FailoverError::Address {
                addr: addr.to_string(),
                why: e.to_string(),
            })?
            .next()
            .ok_or_else(|| FailoverError::Address {
                addr: addr.to_string(),
                why: "no address".into(),
            })?;
        let io = |step| {
            move |source| FailoverError::Io {
                addr: addr.to_string(),
                step,
                source,
            }
        };
        let stream = TcpStream::connect_timeout(&sa, timeout).map_err(io("connect"))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(io("socket options"))?;
        let reader = BufReader::new(stream.try_clone().map_err(io("socket"))?);
        Ok(Standby {
            addr: addr.to_string(),
            reader,
            stream,
        })
    }

    fn io(&self, step: &'static str) -> impl Fn(std::io::Error) -> FailoverError + '_ {
        move |source| FailoverError::Io {
            addr: self.addr.clone(),
            step,
            source,
        }
    }

    /// One reply line (bounded).
    fn reply(&mut self, step: &'static str) -> Result<String, FailoverError> {
        let mut line = Vec::new();
        let mut limited = (&mut self.reader).take(MAX_REPLY as u64);
        limited
            .read_until(b'\n', &mut line)
            .map_err(|source| FailoverError::Io {
                addr: self.addr.clone(),
                step,
                source,
            })?;
        Ok(String::from_utf8_lossy(&line).trim_end().to_string())
    }

    fn import(&mut self, records: &[(u64, &[u8])]) -> Result<usize, FailoverError> {
        let mut msg = format!("IMPORT {}\n", records.len()).into_bytes();
        for (id, data) in records {
            msg.extend_from_slice(format!("{id} {}\n", data.len()).as_bytes());
            msg.extend_from_slice(data);
        }
        self.stream.write_all(&msg).map_err(self.io("IMPORT"))?;
        let reply = self.reply("IMPORT")?;
        match reply.strip_prefix("IMPORTED ").map(str::parse::<usize>) {
            Some(Ok(n)) if n == records.len() => Ok(n),
            _ => Err(FailoverError::Refused {
                addr: self.addr.clone(),
                step: "IMPORT",
                reply,
            }),
        }
    }

    fn takeover(&mut self) -> Result<String, FailoverError> {
        self.stream
            .write_all(b"TAKEOVER\n")
            .map_err(self.io("TAKEOVER"))?;
        let reply = self.reply("TAKEOVER")?;
        if reply.starts_with("SERVING") {
            Ok(reply)
        } else {
            Err(FailoverError::Refused {
                addr: self.addr.clone(),
                step: "TAKEOVER",
                reply,
            })
        }
    }
}
