//! `rdma-bridge`: serve a bdvmm guest's memory and pause lock to remote monitors, make their keys,
//! and (as a monitor) read a guest through a bridge.
//!
//! Exit codes: 0 success (for `serve`: the VM exited), 1 failure at run time, 2 bad input.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use introspect::target::KernelFiles;
use rdma_bridge::backend::{Backend, DumpBackend, VmBackend};
use rdma_bridge::client::{Bridge, BridgeMem};
use rdma_bridge::config::{BridgeConfig, RangeSpec};
use rdma_bridge::server::Server;
use rdma_bridge::tls::{self, Identity};

#[derive(Parser)]
#[command(
    name = "rdma-bridge",
    version,
    about = "The remote backdoor: guest memory and the pause lock for remote monitors, behind the Guard",
    long_about = "The remote backdoor of a bdvmm guest.\n\n\
        `serve` runs next to bdvmm (its own process: if it dies the guest runs on; when the VM exits \
        it stops). Monitors connect over mutual TLS with their own keys; the config file says what \
        each may read and write, whether it may pause the guest (`lock`) or read its registers \
        (`regs`), and how many must agree on a write. Connections still in their handshake have a \
        bounded pool of their own (`max_startups`, `login_grace_ms`), so no unauthenticated peer \
        can lock a listed monitor out.\n\n\
        Quick start:\n  \
        rdma-bridge pki init --dir pki && rdma-bridge pki issue --dir pki --name mon1\n  \
        rdma-bridge serve --config bridge.toml --api /run/vm.sock\n  \
        rdma-bridge sb --bridge 10.0.0.1:7070 --pki pki --name mon1"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a VM (or a memory dump) to the monitors named in the config.
    Serve {
        /// Bridge config (TOML; see `rdma-bridge/README.md`).
        #[arg(long)]
        config: PathBuf,
        /// bdvmm's control socket (`bdvmm run --api`).
        #[arg(long, conflicts_with = "dump", required_unless_present = "dump")]
        api: Option<PathBuf>,
        /// Serve a raw memory dump (read-only unless --dump-writable) instead of a live VM.
        #[arg(long, requires = "backdoor")]
        dump: Option<PathBuf>,
        /// With --dump: the backdoor range of the dumped guest, `0xSTART+0xLEN`.
        #[arg(long)]
        backdoor: Option<String>,
        /// With --dump: serve it read-write, so that granted writes (TCP WRITE and one-sided RDMA
        /// writes to the hooks) change the file; for tests on a scratch copy.
        #[arg(long, requires = "dump")]
        dump_writable: bool,
    },
    /// Make keys and certificates.
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
    /// (monitor) Fetch and print a guest's Sensor Box through a bridge; for a stock guest, its
    /// virtual sensors (its kernel found in its memory; needs `read = ["sb", "ram"]`, `lock`
    /// and `regs`).
    Sb {
        #[command(flatten)]
        who: Who,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// (monitor) Read a guest's process table through a bridge (takes the lock briefly; the
    /// monitor's entry needs `read = ["sb", "ram"]`, `lock = true` and `regs = true`).
    Ps {
        #[command(flatten)]
        who: Who,
        /// The guest's System.map: an optional override for a stock kernel, whose symbols are
        /// otherwise found in its memory (with --vmlinux).
        #[arg(long, requires = "vmlinux")]
        system_map: Option<PathBuf>,
        /// The guest's vmlinux, for BTF (stock kernels; with --system-map).
        #[arg(long, requires = "system_map")]
        vmlinux: Option<PathBuf>,
        /// Longest the task-list walk may hold the guest paused, in milliseconds (a large table
        /// over a slow link or in a nested guest may need more than the default 1000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        walk_ms: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct Who {
    /// The bridge, HOST:PORT.
    #[arg(long)]
    bridge: String,
    /// Directory with ca.pem, NAME.pem and NAME.key (as `pki` writes them).
    #[arg(long)]
    pki: PathBuf,
    /// This monitor's name.
    #[arg(long)]
    name: String,
    /// The name in the bridge's certificate.
    #[arg(long, default_value = tls::DEFAULT_SERVER_NAME)]
    server_name: String,
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a CA and the bridge's certificate in DIR (never overwrites).
    Init {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Name monitors will expect in the bridge's certificate.
        #[arg(long, default_value = tls::DEFAULT_SERVER_NAME)]
        server_name: String,
    },
    /// Issue a monitor's key and certificate from the CA in DIR; prints its SHA-256.
    Issue {
        /// Directory made by `pki init`.
        #[arg(long)]
        dir: PathBuf,
        /// The monitor's name.
        #[arg(long)]
        name: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in a log file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, msg)) => {
            eprintln!("rdma-bridge: {msg}");
            ExitCode::from(code)
        }
    }
}

const BAD_INPUT: u8 = 2;
const FAILED: u8 = 1;

fn identity(w: &Who) -> Identity {
    let mut id = Identity::from_pki_dir(&w.pki, &w.name);
    id.server_name = w.server_name.clone();
    id
}

/// A command that prints for a shell (`… | head`) dies of SIGPIPE, quietly, when its reader goes
/// away — as Unix tools do — instead of panicking in `println!` (Rust ignores SIGPIPE). Never
/// for a long-running server: its sockets' writes use MSG_NOSIGNAL anyway, but its stdout may be
/// a log pipe whose reader it must outlive.
fn die_quietly_when_stdout_closes() {
    // SAFETY: restores the default disposition of one signal; no handler is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn run(cli: Cli) -> Result<(), (u8, String)> {
    if !matches!(cli.cmd, Cmd::Serve { .. }) {
        die_quietly_when_stdout_closes();
    }
    match cli.cmd {
        Cmd::Serve {
            config,
            api,
            dump,
            backdoor,
            dump_writable,
        } => serve(&config, api, dump, backdoor, dump_writable),
        Cmd::Pki { cmd } => match cmd {
            PkiCmd::Init { dir, server_name } => {
                tls::pki_init(&dir, &server_name).map_err(|e| (FAILED, e.to_string()))?;
                println!("CA and bridge certificate written to {}", dir.display());
                Ok(())
            }
            PkiCmd::Issue { dir, name } => {
                let fp = tls::pki_issue(&dir, &name).map_err(|e| (FAILED, e.to_string()))?;
                println!("{name} sha256 {fp}");
                Ok(())
            }
        },
        Cmd::Sb { who, json } => {
            let b = Bridge::connect(&who.bridge, &identity(&who))
                .map_err(|e| (FAILED, e.to_string()))?;
            let sb = BridgeMem::new(b)
                .sensors()
                .map_err(|e| (FAILED, e.to_string()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sb).unwrap_or_default());
            } else {
                introspect::show::print_sensor_box(&sb);
            }
            Ok(())
        }
        Cmd::Ps {
            who,
            system_map,
            vmlinux,
            walk_ms,
            json,
        } => {
            let b = Bridge::connect(&who.bridge, &identity(&who))
                .map_err(|e| (FAILED, e.to_string()))?;
            let mem = BridgeMem::new(b);
            let files = match (&system_map, &vmlinux) {
                (Some(s), Some(v)) => Some(KernelFiles::Files {
                    system_map: s,
                    vmlinux: v,
                }),
                _ => None,
            };
            let limits = introspect::tasks::Limits {
                max_time: std::time::Duration::from_millis(walk_ms),
                ..Default::default()
            };
            let t = mem
                .process_table_within(files, limits)
                .map_err(|e| (FAILED, e.to_string()))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&t.value).unwrap_or_default()
                );
            } else {
                introspect::show::print_process_table(&t.value);
            }
            eprintln!(
                "{} tasks; lock taken {} time(s){}; {} READ round trips",
                t.value.len(),
                t.attempts,
                if t.forced { " (forced)" } else { "" },
                mem.round_trips()
            );
            Ok(())
        }
    }
}

fn serve(
    config: &std::path::Path,
    api: Option<PathBuf>,
    dump: Option<PathBuf>,
    backdoor: Option<String>,
    dump_writable: bool,
) -> Result<(), (u8, String)> {
    let cfg = BridgeConfig::load(config).map_err(|e| (BAD_INPUT, e.to_string()))?;
    let (backend, vm): (Arc<dyn Backend>, Option<Arc<VmBackend>>) = match (api, dump) {
        (Some(sock), _) => {
            let vm = Arc::new(VmBackend::connect(&sock).map_err(|e| (FAILED, e.to_string()))?);
            (vm.clone(), Some(vm))
        }
        (None, Some(path)) => {
            let spec = backdoor.unwrap_or_default();
            let bd = match RangeSpec::parse(&spec) {
                Ok(RangeSpec::Explicit { gpa, len }) => (gpa, len),
                _ => {
                    return Err((
                        BAD_INPUT,
                        format!("--backdoor {spec:?}: expected 0xSTART+0xLEN"),
                    ))
                }
            };
            let d = if dump_writable {
                DumpBackend::open_writable(&path, bd)
            } else {
                DumpBackend::open(&path, bd)
            }
            .map_err(|e| (BAD_INPUT, e.to_string()))?;
            (Arc::new(d), None)
        }
        (None, None) => return Err((BAD_INPUT, "give --api or --dump".into())),
    };
    // With [fleet], SIGTERM and SIGINT are taken by a thread of ours (blocked here, before any
    // thread starts, so every thread inherits the mask) that takes the guest out of the fleet.
    let signals = if cfg.fleet.is_some() {
        Some(block_stop_signals())
    } else {
        None
    };
    // The engine bdvmm reports ("kvm", "tcg"), "vm" if it does not say, "dump" for --dump.
    let engine = match &vm {
        Some(vm) => vm.engine().unwrap_or_else(|| "vm".into()),
        None => "dump".into(),
    };
    let mut server = Server::bind(&cfg, backend).map_err(|e| (FAILED, e.to_string()))?;
    let addr = server.local_addr().map_err(|e| (FAILED, e.to_string()))?;
    let registration = match &cfg.fleet {
        Some(f) => Some(join_fleet(&cfg, f, &mut server, addr, engine)?),
        None => None,
    };
    let registration = Arc::new(std::sync::Mutex::new(registration));
    if let Some(set) = signals {
        let reg = registration.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = wait_signal(&set);
                leave_fleet(&reg);
                eprintln!("rdma-bridge: signal {sig}; stopping");
                std::process::exit(0);
            })
            .map_err(|e| (FAILED, format!("cannot start the signal thread: {e}")))?;
    }
    let server = Arc::new(server);
    // Scripts wait for this line.
    println!("rdma-bridge: listening on {addr}");
    if let Some(vm) = vm {
        let s = server.clone();
        std::thread::spawn(move || {
            if let Err(e) = s.run() {
                eprintln!("rdma-bridge: accept failed: {e}");
                std::process::exit(i32::from(FAILED));
            }
        });
        vm.watch_exit().map_err(|e| (FAILED, e.to_string()))?;
        server.audit("vm_exited", serde_json::json!({}));
        leave_fleet(&registration);
        eprintln!("rdma-bridge: the VM exited; stopping");
        return Ok(());
    }
    let r = server
        .run()
        .map_err(|e| (FAILED, format!("accept failed: {e}")));
    leave_fleet(&registration);
    r
}

/// Registers the guest in etcd and makes the server enforce the fleet's assignment.
fn join_fleet(
    cfg: &BridgeConfig,
    f: &rdma_bridge::config::FleetSection,
    server: &mut Server,
    addr: std::net::SocketAddr,
    engine: String,
) -> Result<fleet::Registration, (u8, String)> {
    let fc = f.fleet_config();
    let cert_sha256 = tls::load_certs(&cfg.tls.cert)
        .ok()
        .and_then(|c| c.first().map(|c| tls::fingerprint(c)))
        .unwrap_or_default();
    let watcher = fleet::Watcher::start(fc.clone()).map_err(|e| (FAILED, e.to_string()))?;
    if !watcher.connected() {
        eprintln!(
            "rdma-bridge: etcd {} does not answer yet; watching the fleet in the background",
            fc.endpoints.join(",")
        );
    }
    let per_guest = f.per_guest(cfg.agreement.k);
    server
        .use_fleet(rdma_bridge::assignment::Assignment::new(
            &f.guest, per_guest, watcher,
        ))
        .map_err(|e| (FAILED, e.to_string()))?;
    let record = fleet::GuestRecord {
        name: f.guest.clone(),
        bridge: f.advertise.clone().unwrap_or_else(|| addr.to_string()),
        cert_sha256,
        kernel: f.kernel.clone(),
        engine,
    };
    let reg =
        fleet::Registration::start(fc.clone(), record).map_err(|e| (FAILED, e.to_string()))?;
    // One write per line: scripts read stdout and stderr together, and a line written in pieces
    // could be cut by the "listening on" line.
    let line = if reg.registered() {
        format!(
            "rdma-bridge: registered guest {} in etcd {}\n",
            f.guest,
            fc.endpoints.join(",")
        )
    } else {
        format!(
            "rdma-bridge: etcd {} does not answer yet; registering guest {} in the background\n",
            fc.endpoints.join(","),
            f.guest
        )
    };
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    Ok(reg)
}

/// Takes the guest out of the fleet at once (revokes its lease), once.
fn leave_fleet(reg: &std::sync::Mutex<Option<fleet::Registration>>) {
    let taken = match reg.lock() {
        Ok(mut g) => g.take(),
        Err(p) => p.into_inner().take(),
    };
    if let Some(r) = taken {
        r.close();
    }
}

/// Blocks SIGTERM and SIGINT in this thread (and the threads it starts); returns the set.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; these calls only change this thread's signal mask.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// Waits for one of the signals in `set` (blocked in every thread); returns its number.
fn wait_signal(set: &libc::sigset_t) -> i32 {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is a valid, initialised sigset_t and `sig` a valid out-pointer.
        if unsafe { libc::sigwait(set, &mut sig) } == 0 {
            return sig;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
