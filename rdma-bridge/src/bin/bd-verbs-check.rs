//! `bd-verbs-check`: the monitor side of the SoftRoCE test (issue 12). Connects to a bridge that
//! serves a patched guest's memory with `[rdma]`, runs the verbs transport's reads, writes and
//! isolation checks against it, and measures READ latency over RDMA and over TCP.
//!
//! The bridge config must list monitor `--rw` with `read = ["sb", "ram"]`, `write = ["hooks"]` (and
//! the lock permission) and monitor `--ro` with `read = ["sb"]`, with `[agreement] k = 1`.
//!
//! Output: one JSON object per line on stdout —
//! `{"check":NAME,"ok":BOOL,"detail":TEXT}` per check and
//! `{"bench":"read_sb","transport":"rdma"|"tcp","n":N,"median_us":X,"p99_us":Y}`.
//! Exit status: 0 iff every check is ok, 1 if any failed, 2 on usage errors.
//!
//! Checks, in order: `rdma_connect_rw`, `read_sb_rdma`, `read_tasks_rdma`, `write_hooks_rdma`,
//! `write_without_lock_refused`, `ro_cannot_write`, `guessed_rkey_refused`,
//! `closed_session_qp_gone`, `qp_quota`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use introspect::mem::PhysMem;
use introspect::target::{KernelFiles, Target};
use introspect::tasks::Process;
use rdma_bridge::client::{Bridge, BridgeMem, InspectError, TransportMem};
use rdma_bridge::config::{HOOKS_OFFSET, HOOKS_SIZE, SB_OFFSET};
use rdma_bridge::rdma::MAX_QPS_PER_MONITOR;
use rdma_bridge::tls::Identity;
use rdma_bridge::verbs::{
    decode_connect, encode_connect, Access, RegionInfo, VerbsError, VerbsMonitor,
};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "bd-verbs-check",
    about = "Checks the bridge's RDMA verbs transport (reads, writes, isolation) and measures it",
    after_help = "Example:\n  bd-verbs-check --bridge 10.77.0.1:7070 --pki pki \
        --server-name backdoors-bridge --rw mon-rw --ro mon-ro --reads 2000\n\n\
        Prints one JSON object per line; exit 0 iff every check is ok, 1 if one failed, 2 on \
        usage errors."
)]
struct Cli {
    /// The bridge's control channel (TCP + TLS), HOST:PORT.
    #[arg(long)]
    bridge: String,
    /// Directory with ca.pem and NAME.pem / NAME.key for both monitors (`rdma-bridge pki`).
    #[arg(long)]
    pki: PathBuf,
    /// The name in the bridge's certificate.
    #[arg(long, default_value = rdma_bridge::tls::DEFAULT_SERVER_NAME)]
    server_name: String,
    /// The monitor granted read ["sb", "ram"], write ["hooks"] and the lock.
    #[arg(long)]
    rw: String,
    /// The monitor granted read ["sb"] only.
    #[arg(long)]
    ro: String,
    /// READs per transport for the latency measurement.
    #[arg(long, default_value_t = 2000)]
    reads: usize,
    /// RDMA device on this side (the first one if absent).
    #[arg(long)]
    device: Option<String>,
    /// System.map of a stock guest kernel (a patched guest needs none).
    #[arg(long, requires = "stock_vmlinux")]
    stock_system_map: Option<PathBuf>,
    /// vmlinux of a stock guest kernel (a patched guest needs none).
    #[arg(long, requires = "stock_system_map")]
    stock_vmlinux: Option<PathBuf>,
}

/// A TLS session with its RDMA connection.
struct Rdma {
    bridge: Bridge,
    mon: VerbsMonitor,
    regions: Vec<RegionInfo>,
}

struct Checker {
    cli: Cli,
    failed: usize,
}

/// A check's verdict: what it saw when it passed, or why it failed.
type Outcome = Result<String, Failed>;

/// Why a check failed, as its report line says it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

impl From<String> for Failed {
    fn from(why: String) -> Failed {
        Failed(why)
    }
}

impl From<&str> for Failed {
    fn from(why: &str) -> Failed {
        Failed(why.to_owned())
    }
}

/// A failed check.
fn fail(why: String) -> Outcome {
    Err(Failed(why))
}

/// A session or queue pair the checks need could not be set up.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("{name}: TLS session: {source}")]
    Session {
        name: String,
        source: rdma_bridge::client::ClientError,
    },
    #[error("open the RDMA device: {0}")]
    Device(VerbsError),
    #[error("encode: {0}")]
    Encode(VerbsError),
    #[error("RDMA_CONNECT refused: {0}")]
    Refused(rdma_bridge::client::ClientError),
    #[error("the bridge's connect blob: {0}")]
    Blob(VerbsError),
    #[error("connect the queue pair: {0}")]
    QueuePair(VerbsError),
}

/// A check that could not set up fails with the reason.
impl From<SetupError> for Failed {
    fn from(e: SetupError) -> Failed {
        Failed(e.to_string())
    }
}

impl Checker {
    fn id(&self, name: &str) -> Identity {
        let mut id = Identity::from_pki_dir(&self.cli.pki, name);
        id.server_name = self.cli.server_name.clone();
        id
    }

    fn session(&self, name: &str) -> Result<Bridge, SetupError> {
        Bridge::connect(&self.cli.bridge, &self.id(name)).map_err(|source| SetupError::Session {
            name: name.to_owned(),
            source,
        })
    }

    /// RDMA_CONNECT on `bridge` with a new monitor-side queue pair (replacing the one the
    /// session had, if any).
    fn rdma_on(&self, bridge: &mut Bridge) -> Result<(VerbsMonitor, Vec<RegionInfo>), SetupError> {
        let mut mon = VerbsMonitor::open(self.cli.device.as_deref()).map_err(SetupError::Device)?;
        mon.set_timeout(Duration::from_secs(3));
        let blob = encode_connect(&mon.local_endpoint(), &[]).map_err(SetupError::Encode)?;
        let reply = bridge.rdma_connect(blob).map_err(SetupError::Refused)?;
        let (ep, regions) = decode_connect(&reply).map_err(SetupError::Blob)?;
        mon.connect(ep, regions.clone())
            .map_err(SetupError::QueuePair)?;
        Ok((mon, regions))
    }

    fn connect(&self, name: &str) -> Result<Rdma, SetupError> {
        let mut bridge = self.session(name)?;
        let (mon, regions) = self.rdma_on(&mut bridge)?;
        Ok(Rdma {
            bridge,
            mon,
            regions,
        })
    }

    /// A new queue pair for `r`'s session (the old one is released by the bridge).
    fn reconnect(&self, mut r: Rdma) -> Option<Rdma> {
        match self.rdma_on(&mut r.bridge) {
            Ok((mon, regions)) => {
                r.mon = mon;
                r.regions = regions;
                Some(r)
            }
            Err(e) => {
                eprintln!("bd-verbs-check: reconnecting: {e}");
                None
            }
        }
    }

    fn report(&mut self, check: &str, outcome: Outcome) {
        let (ok, detail) = match outcome {
            Ok(d) => (true, d),
            Err(Failed(d)) => (false, d),
        };
        if !ok {
            self.failed += 1;
        }
        println!("{}", json!({"check": check, "ok": ok, "detail": detail}));
    }
}

fn covers(regions: &[RegionInfo], access: Access, gpa: u64, len: u64) -> bool {
    regions.iter().any(|r| {
        r.access == access && gpa >= r.gpa && gpa.saturating_add(len) <= r.gpa.saturating_add(r.len)
    })
}

fn show(regions: &[RegionInfo]) -> String {
    regions
        .iter()
        .map(|r| format!("{} {:?} {:#x}+{:#x}", r.name, r.access, r.gpa, r.len))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The last mailbox slot: 32 bytes at the end of the hook mailbox.
fn hook_slot(backdoor: u64) -> u64 {
    backdoor + HOOKS_OFFSET + HOOKS_SIZE - 32
}

fn check_connect_rw(rw: &Rdma) -> Outcome {
    let (bd, _) = rw.bridge.backdoor();
    let sb = covers(&rw.regions, Access::RemoteRead, bd + SB_OFFSET, 4096);
    let hooks = covers(
        &rw.regions,
        Access::RemoteWrite,
        bd + HOOKS_OFFSET,
        HOOKS_SIZE,
    );
    let ram = rw
        .regions
        .iter()
        .any(|r| r.access == Access::RemoteRead && r.len > 16 << 20);
    if sb && hooks && ram {
        Ok(format!("regions: {}", show(&rw.regions)))
    } else {
        fail(format!(
            "expected sb (read), ram (read) and hooks (write); got {}",
            show(&rw.regions)
        ))
    }
}

fn check_read_sb(rw: &mut Rdma) -> Outcome {
    let (bd, _) = rw.bridge.backdoor();
    let tcp = rw.bridge.fetch_sb().map_err(|e| format!("FETCH_SB: {e}"))?;
    let rdma = rw
        .mon
        .read(bd + SB_OFFSET, tcp.len())
        .map_err(|e| format!("RDMA READ: {e}"))?;
    if rdma == tcp {
        Ok(format!("{} bytes equal FETCH_SB", tcp.len()))
    } else {
        let first = rdma.iter().zip(&tcp).position(|(a, b)| a != b);
        fail(format!(
            "{} bytes differ from FETCH_SB (first difference at {first:?})",
            tcp.len()
        ))
    }
}

/// Locates the kernel and walks the process table reading guest memory through `mem`, pausing
/// with `tcp`'s lock. On a patched guest a REGS refusal (a dump has no vCPUs; the monitor may lack
/// the permission) is no obstacle: the Sensor Box descriptor gives the kernel's own page tables.
fn walk(
    mem: &dyn PhysMem,
    tcp: &BridgeMem,
    files: Option<KernelFiles<'_>>,
) -> Result<Vec<Process>, InspectError> {
    let patched = files.is_none();
    let (gpa, size) = tcp.bridge().backdoor();
    let files = files.unwrap_or(KernelFiles::SensorBox { gpa, size });
    let mut pauser = tcp.pauser(Duration::from_secs(5));
    let target = Target::locate_paused(
        mem,
        &mut pauser,
        |_| match tcp.bridge().regs(0) {
            Ok(r) => Ok((r.cr3, r.cr4)),
            Err(_) if patched => Ok((0, 0)),
            Err(e) => Err(InspectError::from(e)),
        },
        files,
    )?;
    let t =
        target.process_table::<_, InspectError>(mem, &mut pauser, Duration::from_millis(500))?;
    Ok(t.value)
}

fn check_read_tasks(c: &Checker, rw: Rdma) -> (Outcome, Rdma) {
    let Rdma {
        bridge,
        mon,
        regions,
    } = rw;
    let files = match (&c.cli.stock_system_map, &c.cli.stock_vmlinux) {
        (Some(s), Some(v)) => Some(KernelFiles::Files {
            system_map: s,
            vmlinux: v,
        }),
        _ => None,
    };
    let rdma_mem = TransportMem::new(mon);
    let outcome = (|| {
        let tcp = BridgeMem::new(c.session(&c.cli.rw)?);
        let over_tcp = walk(&tcp, &tcp, files).map_err(|e| format!("walk over TCP: {e}"))?;
        let tcp_reads = tcp.round_trips();
        let over_rdma = walk(&rdma_mem, &tcp, files).map_err(|e| format!("walk over RDMA: {e}"))?;
        if over_rdma == over_tcp {
            Ok(format!(
                "{} tasks, equal over RDMA ({} READs) and TCP ({tcp_reads} READs)",
                over_tcp.len(),
                rdma_mem.round_trips(),
            ))
        } else {
            fail(format!(
                "the walks differ: {} tasks over RDMA, {} over TCP",
                over_rdma.len(),
                over_tcp.len()
            ))
        }
    })();
    let rw = Rdma {
        bridge,
        mon: rdma_mem.into_inner(),
        regions,
    };
    (outcome, rw)
}

fn check_write_hooks(rw: &mut Rdma) -> Outcome {
    let (bd, _) = rw.bridge.backdoor();
    let slot = hook_slot(bd);
    rw.bridge
        .lock(Duration::from_secs(5))
        .map_err(|e| format!("LOCK: {e}"))?;
    let result = (|| {
        let before = rw
            .bridge
            .read(slot, 32)
            .map_err(|e| format!("TCP READ: {e}"))?;
        let pattern: Vec<u8> = (0..32u8).map(|i| 0xA0 ^ i).collect();
        rw.mon
            .write(slot, &pattern)
            .map_err(|e| format!("RDMA WRITE under the lock: {e}"))?;
        let after = rw
            .bridge
            .read(slot, 32)
            .map_err(|e| format!("TCP READ back: {e}"))?;
        // Put the slot back as it was, still under the lock.
        rw.mon
            .write(slot, &before)
            .map_err(|e| format!("RDMA WRITE (restore): {e}"))?;
        if after == pattern {
            Ok(format!(
                "32 bytes at {slot:#x} written over RDMA read back equal over TCP (and restored)"
            ))
        } else {
            fail(format!(
                "wrote {pattern:02x?} over RDMA, read {after:02x?} over TCP"
            ))
        }
    })();
    let unlocked = rw.bridge.unlock().map_err(|e| format!("UNLOCK: {e}"));
    let detail = result?;
    unlocked?;
    Ok(detail)
}

fn check_write_without_lock(rw: &mut Rdma) -> Outcome {
    let (bd, _) = rw.bridge.backdoor();
    let slot = hook_slot(bd);
    let before = rw
        .bridge
        .read(slot, 32)
        .map_err(|e| format!("TCP READ: {e}"))?;
    let refused = match rw.mon.write(slot, &[0x5A; 32]) {
        Ok(()) => return fail("an RDMA WRITE without the lock completed".into()),
        Err(e) => e.to_string(),
    };
    let after = rw
        .bridge
        .read(slot, 32)
        .map_err(|e| format!("TCP READ back: {e}"))?;
    if after != before {
        return fail(format!(
            "the WRITE failed ({refused}) but the slot changed anyway"
        ));
    }
    Ok(format!("refused: {refused}; the slot is unchanged"))
}

/// The read-only monitor gets no write region, and its queue pair cannot write, neither with the
/// rw monitor's hooks rkey nor with its own read rkey (each attempt on a fresh queue pair of the
/// same session: a refusal breaks the one it was posted on).
fn check_ro_cannot_write(c: &Checker, ro: Rdma, rw_regions: &[RegionInfo]) -> Outcome {
    if let Some(w) = ro.regions.iter().find(|r| r.access == Access::RemoteWrite) {
        return fail(format!(
            "the read-only monitor got a write region: {}",
            w.name
        ));
    }
    let shown = show(&ro.regions);
    let (bd, _) = ro.bridge.backdoor();
    let slot = hook_slot(bd);
    let hooks = rw_regions
        .iter()
        .find(|r| r.access == Access::RemoteWrite)
        .cloned()
        .ok_or("the rw monitor has no write region to borrow")?;
    let sb = ro
        .regions
        .iter()
        .find(|r| r.access == Access::RemoteRead && r.gpa <= slot && slot < r.gpa + r.len)
        .cloned()
        .ok_or_else(|| format!("no Sensor Box region: {shown}"))?;
    let mut ro = Some(ro);
    let mut refusals = Vec::new();
    for (what, addr, rkey) in [
        (
            "rw's hooks rkey",
            hooks.remote_addr + (slot - hooks.gpa),
            hooks.rkey,
        ),
        (
            "its own read rkey",
            sb.remote_addr + (slot - sb.gpa),
            sb.rkey,
        ),
    ] {
        let mut r = ro
            .take()
            .ok_or("could not reconnect the read-only monitor")?;
        let before = r
            .bridge
            .read(slot, 32)
            .map_err(|e| format!("TCP READ: {e}"))?;
        match r.mon.write_raw(addr, rkey, &[0x66; 32]) {
            Ok(()) => return fail(format!("an RDMA WRITE with {what} completed")),
            Err(e) => refusals.push(format!("with {what}: {e}")),
        }
        let after = r
            .bridge
            .read(slot, 32)
            .map_err(|e| format!("TCP READ back: {e}"))?;
        if after != before {
            return fail(format!(
                "the WRITE with {what} failed but the bytes changed"
            ));
        }
        ro = c.reconnect(r);
    }
    Ok(format!(
        "no write region ({shown}); raw WRITEs refused {}",
        refusals.join("; ")
    ))
}

fn check_guessed_rkey(rw: &mut Rdma, ro: &mut Rdma) -> Outcome {
    let ram = rw
        .regions
        .iter()
        .filter(|r| r.access == Access::RemoteRead)
        .max_by_key(|r| r.len)
        .cloned()
        .ok_or("the rw monitor has no read region")?;
    let off = (ram.len / 2) & !0xfff;
    // The rkey works on its own monitor's queue pair ...
    let own = rw
        .mon
        .read_raw(ram.remote_addr + off, ram.rkey, 64)
        .map_err(|e| format!("the rw monitor's own READ with its rkey failed: {e}"))?;
    // ... and not on another monitor's.
    match ro.mon.read_raw(ram.remote_addr + off, ram.rkey, 64) {
        Ok(got) => fail(format!(
            "the ro monitor READ the rw monitor's ram with its rkey {:#x} ({} bytes{})",
            ram.rkey,
            got.len(),
            if got == own { ", equal" } else { "" }
        )),
        Err(e) => Ok(format!(
            "rkey {:#x} of {} works on rw's QP, refused on ro's: {e}",
            ram.rkey, ram.name
        )),
    }
}

fn check_closed_session(c: &Checker) -> Outcome {
    let Rdma {
        bridge, mut mon, ..
    } = c.connect(&c.cli.rw)?;
    let (bd, _) = bridge.backdoor();
    mon.read(bd + SB_OFFSET, 64)
        .map_err(|e| format!("READ before closing: {e}"))?;
    drop(bridge);
    // The bridge releases the queue pair when it sees the session end; give it (bounded) time.
    let give_up = Instant::now() + Duration::from_secs(15);
    let mut reads = 0u32;
    loop {
        reads += 1;
        match mon.read(bd + SB_OFFSET, 64) {
            Err(e) => {
                return Ok(format!(
                    "after the TLS session closed, READ {reads} on the old QP failed: {e}"
                ))
            }
            Ok(_) if Instant::now() >= give_up => {
                return fail(format!(
                    "{reads} READs on the closed session's QP still succeeded after 15 s"
                ))
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn check_qp_quota(c: &Checker, held: usize) -> Outcome {
    // `held` queue pairs of the rw monitor are connected already.
    let mut extra = Vec::new();
    for i in held..MAX_QPS_PER_MONITOR {
        extra.push(
            c.connect(&c.cli.rw)
                .map_err(|e| format!("QP {}: {e}", i + 1))?,
        );
    }
    let mut over = c.session(&c.cli.rw)?;
    match c.rdma_on(&mut over) {
        Ok(_) => fail(format!(
            "a queue pair beyond the cap of {MAX_QPS_PER_MONITOR} was connected"
        )),
        Err(e) => Ok(format!(
            "{MAX_QPS_PER_MONITOR} queue pairs connected, the next refused: {e}"
        )),
    }
}

fn percentile(sorted: &[Duration], p: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = (sorted.len() * p / 100).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1e6
}

fn bench<E: std::fmt::Display>(transport: &str, n: usize, mut op: impl FnMut() -> Result<(), E>) {
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        if let Err(e) = op() {
            eprintln!("bd-verbs-check: bench {transport}: {e}");
            return;
        }
        t.push(start.elapsed());
    }
    t.sort();
    println!(
        "{}",
        json!({"bench": "read_sb", "transport": transport, "n": n,
               "median_us": percentile(&t, 50), "p99_us": percentile(&t, 99)})
    );
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut c = Checker { cli, failed: 0 };

    let mut rw = match c.connect(&c.cli.rw) {
        Ok(rw) => {
            let o = check_connect_rw(&rw);
            c.report("rdma_connect_rw", o);
            Some(rw)
        }
        Err(e) => {
            c.report("rdma_connect_rw", Err(e.into()));
            None
        }
    };
    let skipped = || fail("skipped: rdma_connect_rw failed".into());

    let o = rw.as_mut().map_or_else(skipped, check_read_sb);
    c.report("read_sb_rdma", o);

    let (o, back) = match rw.take() {
        Some(r) => {
            let (o, r) = check_read_tasks(&c, r);
            (o, Some(r))
        }
        None => (skipped(), None),
    };
    rw = back;
    c.report("read_tasks_rdma", o);

    let o = rw.as_mut().map_or_else(skipped, check_write_hooks);
    c.report("write_hooks_rdma", o);

    let o = rw.as_mut().map_or_else(skipped, check_write_without_lock);
    c.report("write_without_lock_refused", o);
    // That refusal broke rw's queue pair: replace it on the same session.
    rw = rw.and_then(|r| c.reconnect(r));

    let o = match (rw.as_ref(), c.connect(&c.cli.ro)) {
        (Some(rw), Ok(ro)) => check_ro_cannot_write(&c, ro, &rw.regions),
        (None, _) => skipped(),
        (_, Err(e)) => Err(e.into()),
    };
    c.report("ro_cannot_write", o);

    let o = match (rw.as_mut(), c.connect(&c.cli.ro)) {
        (Some(rw), Ok(mut ro)) => check_guessed_rkey(rw, &mut ro),
        (None, _) => skipped(),
        (_, Err(e)) => Err(e.into()),
    };
    c.report("guessed_rkey_refused", o);
    // rw's queue pair still works after ro's refusals (they broke only ro's).
    if let Some(r) = rw.as_mut() {
        if let Err(e) = r.mon.read(r.bridge.backdoor().0, 8) {
            eprintln!("bd-verbs-check: rw after the refusals: {e}; reconnecting");
            rw = rw.and_then(|r| c.reconnect(r));
        }
    }

    let o = check_closed_session(&c);
    c.report("closed_session_qp_gone", o);

    let o = check_qp_quota(&c, usize::from(rw.is_some()));
    c.report("qp_quota", o);

    if let Some(mut r) = rw {
        let n = c.cli.reads.max(1);
        let (bd, _) = r.bridge.backdoor();
        match r.bridge.fetch_sb() {
            Ok(sb) => {
                let len = sb.len();
                let len32 = u32::try_from(len).unwrap_or(u32::MAX);
                bench("rdma", n, || r.mon.read(bd + SB_OFFSET, len).map(drop));
                bench("tcp", n, || r.bridge.read(bd + SB_OFFSET, len32).map(drop));
            }
            Err(e) => eprintln!("bd-verbs-check: bench: FETCH_SB: {e}"),
        }
    }

    if c.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
