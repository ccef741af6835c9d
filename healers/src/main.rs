//! `bdmon`: the remote healer's command line.
//!
//! Exit codes: 0 success, 1 failure at run time, 2 bad input (config, arguments).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdmon::config::Config;
use bdmon::contract::Checker;
use bdmon::events::Events;
use bdmon::guest::Guest;
use bdmon::metrics::Metrics;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bdmon",
    version,
    about = "The remote healer: watches guests' Sensor Boxes through their bridges and heals them",
    long_about = "The remote healer of Backdoors.\n\n\
        `bdmon run` attaches to every guest in the config (through its rdma-bridge, with this \
        monitor's key), samples each Sensor Box, and when a sensor breaks its contract calls the \
        healing modules registered for it: Proc_Repair_Healer (fork bombs), Mem_Reclaim_Healer \
        (memory hogs), CPU_Share_Healer (one user's processes starving the rest: renice, stop or \
        kill) and the hang detector (which first frees a CPU one task holds). Every detection, diagnosis and repair is a JSON line \
        in the event log.\n\n\
        `bdmon status` shows each guest's sensors at a glance; `bdmon check` validates a config; \
        `bdmon resume-user` continues a user that CPU_Share_Healer stopped."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Watch and heal until SIGINT/SIGTERM (or --for); SIGUSR1 samples every guest at once.
    Run {
        /// Config file (TOML; see the bdmon README).
        #[arg(long)]
        config: PathBuf,
        /// Diagnose and log, kill nothing (overrides the config).
        #[arg(long)]
        dry_run: bool,
        /// Stop after this many seconds.
        #[arg(long = "for")]
        for_secs: Option<u64>,
    },
    /// Show each guest's sensors, thresholds in force and contract state.
    Status {
        /// Config file.
        #[arg(long)]
        config: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A live view of every guest of the config in this terminal: vCPU state, sensors with a
    /// sparkline of recent samples, the contract's verdict, the last events of the event log
    /// (what `bdmon run` writes) and the time repairs held each guest paused. Read only: it never
    /// pauses or writes a guest. Keys: q quits, ↑/↓ choose a guest.
    Top {
        /// Config file (the same as `bdmon run`'s: its guests, keys and event log).
        #[arg(long)]
        config: PathBuf,
        /// Milliseconds between samples of each guest.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
        interval_ms: u64,
    },
    /// Send SIGCONT to every process of a user in one guest (CONT_UID through the repair hooks
    /// of a patched guest kernel): undoes CPU_Share_Healer's `action = "stop"` before its
    /// `resume_after_s`. bdmon stops the user again if they hog the CPU again; spare them
    /// (`spare_users`) to prevent that.
    ResumeUser {
        /// Config file (the guest's bridge and this monitor's keys).
        #[arg(long)]
        config: PathBuf,
        /// The guest's name in the config.
        #[arg(long)]
        guest: String,
        /// The user whose processes continue.
        #[arg(long)]
        uid: u32,
    },
    /// Check a config file and exit; a stock guest's `system_map`/`vmlinux` must parse and,
    /// when its bridge answers, belong to the kernel it runs (checked against `linux_banner`;
    /// this pauses the guest once, to read CR3).
    Check {
        /// Config file.
        #[arg(long)]
        config: PathBuf,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);
static SAMPLE_NOW: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGUSR1 {
        SAMPLE_NOW.store(true, Ordering::SeqCst);
    } else {
        STOP.store(true, Ordering::SeqCst);
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in a log file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, msg)) => {
            eprintln!("bdmon: {msg}");
            ExitCode::from(code)
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, (u8, String)> {
    Config::load(path).map_err(|e| (2, e.to_string()))
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
    if !matches!(cli.cmd, Cmd::Run { .. }) {
        die_quietly_when_stdout_closes();
    }
    match cli.cmd {
        Cmd::Check { config } => {
            let c = load(&config)?;
            let mut bad = Vec::new();
            for g in &c.guests {
                match bdmon::files::check(g) {
                    Ok(Some(note)) => println!("{note}"),
                    Ok(None) => {}
                    Err(e) => bad.push(e.to_string()),
                }
            }
            if !bad.is_empty() {
                return Err((2, bad.join("\n")));
            }
            println!("{}: {} guest(s), OK", config.display(), c.guests.len());
            Ok(())
        }
        Cmd::Status { config, json } => status(&load(&config)?, json),
        Cmd::Top {
            config,
            interval_ms,
        } => top(&load(&config)?, Duration::from_millis(interval_ms)),
        Cmd::ResumeUser { config, guest, uid } => {
            let c = load(&config)?;
            let g = c.guests.iter().find(|g| g.name == guest).ok_or_else(|| {
                (
                    2,
                    format!("no [[guest]] named {guest:?} in {}", config.display()),
                )
            })?;
            let spared = introspect::repair::Spared::new(c.spare_users.iter().copied());
            let done = Guest::new(g.clone())
                .resume_user(uid, &spared)
                .map_err(|e| (1, format!("guest {guest}: {e}")))?;
            println!(
                "guest {guest}: SIGCONT to every process of uid {uid} posted ({} request, {})",
                done.requests,
                done.how.as_str()
            );
            Ok(())
        }
        Cmd::Run {
            config,
            dry_run,
            for_secs,
        } => {
            let mut cfg = load(&config)?;
            cfg.dry_run |= dry_run;
            raise_open_files();
            let events = Arc::new(
                Events::open(&cfg.events)
                    .map_err(|e| (2, format!("cannot open event log {}: {e}", cfg.events)))?,
            );
            let metrics = Arc::new(Metrics::default());
            if let Some(addr) = cfg.metrics {
                let bound = metrics
                    .serve(addr)
                    .map_err(|e| (1, format!("metrics on {addr}: {e}")))?;
                eprintln!("bdmon: metrics on http://{bound}/metrics");
            }
            // SAFETY: installing a handler that only stores to an atomic (async-signal-safe).
            unsafe {
                libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
                libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
                libc::signal(libc::SIGUSR1, on_signal as *const () as libc::sighandler_t);
            }
            let cfg = Arc::new(cfg);
            let handle = bdmon::dispatcher::start(
                cfg.clone(),
                Arc::new(bdmon::default_registry),
                events.clone(),
                metrics,
            )
            .map_err(|e| (1, format!("cannot start: {e}")))?;
            let mut fleet = bdmon::membership::Membership::start(&cfg)
                .map_err(|e| (1, format!("cannot join the fleet: {e}")))?;
            eprintln!(
                "bdmon: watching {} guest(s){}{}",
                cfg.guests.len(),
                match &cfg.fleet {
                    Some(f) => format!(
                        " and the fleet's guests assigned to {} in etcd {}",
                        f.monitor,
                        f.endpoints.join(",")
                    ),
                    None => String::new(),
                },
                if cfg.dry_run { " (dry run)" } else { "" }
            );
            let until = for_secs.map(|s| Instant::now() + Duration::from_secs(s));
            while !STOP.load(Ordering::SeqCst) && until.is_none_or(|u| Instant::now() < u) {
                if let Some(f) = &mut fleet {
                    f.reconcile(&cfg, &handle, &events);
                }
                if SAMPLE_NOW.swap(false, Ordering::SeqCst) {
                    for g in handle.watched() {
                        handle.sample_now(&g);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if let Some(f) = fleet {
                f.leave(&handle);
            }
            handle.stop();
            Ok(())
        }
    }
}

fn top(cfg: &Config, every: Duration) -> Result<(), (u8, String)> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return Err((
            2,
            "bdmon top draws in a terminal; stdout is not one (for a script: bdmon status --json)"
                .into(),
        ));
    }
    bdmon::top::run(cfg, every).map_err(|e| (1, format!("terminal: {e}")))
}

fn status(cfg: &Config, json: bool) -> Result<(), (u8, String)> {
    let mut all = Vec::new();
    let mut failed = false;
    for g in &cfg.guests {
        let mut guest = Guest::new(g.clone());
        let overrides = g.threshold_overrides();
        let checker = Checker::new(overrides).with_names(g.threshold_names());
        let sb = guest.sample();
        let st = guest.status();
        match (&sb, json) {
            (Ok(sb), true) => {
                let sensors: Vec<_> = sb
                    .sensors
                    .iter()
                    .map(|s| {
                        serde_json::json!({"id": s.id, "name": s.name, "class": format!("{:?}", s.class),
                            "value": s.value, "threshold": checker.threshold_in_force(s), "ok": checker.level_ok(s)})
                    })
                    .collect();
                all.push(serde_json::json!({"guest": g.name, "bridge": g.bridge,
                    "vcpus": st.as_ref().ok().map(|s| if s.state == 0 { "running" } else { "paused" }),
                    "sensors": sensors}));
            }
            (Ok(sb), false) => {
                let state = match &st {
                    Ok(s) if s.state == 0 => "running".to_string(),
                    Ok(s) if s.state == 1 => "paused".to_string(),
                    Ok(_) => "stopped".to_string(),
                    Err(e) => format!("unknown ({e})"),
                };
                println!("{} ({}) — vCPUs {state}", g.name, g.bridge);
                println!(
                    "  {:<22} {:<9} {:>14} {:>14}  STATE",
                    "SENSOR", "CLASS", "VALUE", "THRESHOLD"
                );
                for s in &sb.sensors {
                    let class = format!("{:?}", s.class).to_lowercase();
                    let ok = if checker.level_ok(s) { "ok" } else { "BAD" };
                    println!(
                        "  {:<22} {:<9} {:>14} {:>14}  {ok}",
                        s.name,
                        class,
                        s.value,
                        checker.describe_threshold(s)
                    );
                }
                println!(
                    "  (a progress counter's value means nothing by itself: it must move; its \
                     threshold is the longest stall allowed)"
                );
            }
            (Err(e), _) => {
                failed = true;
                if json {
                    all.push(serde_json::json!({"guest": g.name, "bridge": g.bridge, "error": e.to_string()}));
                } else {
                    println!("{} ({}) — unreachable: {e}", g.name, g.bridge);
                }
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
    }
    if failed {
        Err((1, "some guests could not be read".into()))
    } else {
        Ok(())
    }
}

/// Every watched guest holds a socket or two: lift the soft limit on open files to the hard one
/// (1,024 by default, which a thousand guests would exceed).
fn raise_open_files() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}
