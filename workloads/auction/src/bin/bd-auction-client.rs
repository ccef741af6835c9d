//! `bd-auction-client`: runs a checked load against front ends, or acts as a monitor by hand
//! (extract a stopped front end's State Boxes and IMPORT them, TAKEOVER, STATUS).
//!
//! Exit codes: 0 success (every session completed right), 1 failure, 2 bad arguments.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use auction::adminctl;
use auction::client::{run, Load};
use auction::series::{series, to_csv};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bd-auction-client",
    version,
    about = "Load and admin client of the auction service"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run sessions against the front ends (tried in the order given) and check every reply.
    Load {
        /// A front end's client address; repeat for failover targets.
        #[arg(long = "addr", required = true)]
        addrs: Vec<SocketAddr>,
        /// Sessions.
        #[arg(long, default_value_t = 50)]
        sessions: usize,
        /// Requests per session (LOGIN, VIEW/BID mix, LOGOUT).
        #[arg(long, default_value_t = 12)]
        requests: usize,
        /// Timeout of one attempt, ms.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Deadline of the whole run, s.
        #[arg(long, default_value_t = 60)]
        deadline_s: u64,
        /// Seed of session ids and operations.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Think time between a session's requests, ms.
        #[arg(long, default_value_t = 20)]
        think_ms: u64,
        /// Delay between session starts, ms.
        #[arg(long, default_value_t = 50)]
        stagger_ms: u64,
        /// Write the per-100-ms series here (CSV).
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Write the whole report here (JSON).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Read a (stopped) front end's State Boxes from /proc/PID/mem and IMPORT them.
    Import {
        /// The failed front end's process id.
        #[arg(long)]
        pid: u32,
        /// The standby's admin address.
        #[arg(long)]
        admin: SocketAddr,
    },
    /// Tell a front end to take over.
    Takeover {
        /// Its admin address.
        #[arg(long)]
        admin: SocketAddr,
    },
    /// Ask a front end for its status.
    Status {
        /// Its admin address.
        #[arg(long)]
        admin: SocketAddr,
    },
}

fn main() -> ExitCode {
    auction::init_logging("warn");
    // Its reports go to a shell (`… | head`): when the reader goes away, die of SIGPIPE quietly
    // as Unix tools do instead of panicking in `println!`. Its sockets' writes use MSG_NOSIGNAL.
    // SAFETY: restores the default disposition of one signal; no handler is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    match go(Cli::parse().cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bd-auction-client: {e}");
            ExitCode::FAILURE
        }
    }
}

const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
enum CmdError {
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the report as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Extract(#[from] auction::extract::ExtractError),
    #[error(transparent)]
    Admin(#[from] adminctl::AdminError),
}

fn write(path: PathBuf, text: String) -> Result<(), CmdError> {
    std::fs::write(&path, text).map_err(|source| CmdError::Write { path, source })
}

fn go(cmd: Cmd) -> Result<ExitCode, CmdError> {
    match cmd {
        Cmd::Load {
            addrs,
            sessions,
            requests,
            timeout_ms,
            deadline_s,
            seed,
            think_ms,
            stagger_ms,
            csv,
            json,
        } => {
            if requests < 2 {
                eprintln!("bd-auction-client: --requests must be at least 2 (LOGIN, LOGOUT)");
                return Ok(ExitCode::from(2));
            }
            let load = Load {
                addrs,
                sessions,
                requests_per_session: requests,
                timeout: Duration::from_millis(timeout_ms),
                deadline: Duration::from_secs(deadline_s),
                seed,
                think: Duration::from_millis(think_ms),
                stagger: Duration::from_millis(stagger_ms),
                ..Load::default()
            };
            let report = run(&load);
            if let Some(path) = csv {
                let text = to_csv(&series(&report, Duration::from_millis(100)));
                write(path, text)?;
            }
            if let Some(path) = json {
                write(path, serde_json::to_string_pretty(&report)?)?;
            }
            println!(
                "sessions={} completed={} wrong={} gave_up={} requests={} bids={}",
                sessions,
                report.completed,
                report.wrong.len(),
                report.gave_up.len(),
                report.requests.len(),
                report.bids.len()
            );
            for w in &report.wrong {
                println!(
                    "wrong: {} -> {:?} (expected {:?})",
                    w.request, w.got, w.expected
                );
            }
            Ok(if report.completed == sessions {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Import { pid, admin } => {
            let found = auction::extract::from_process(pid)?;
            for (slot, why) in &found.refused {
                eprintln!("slot {slot} refused: {why}");
            }
            let request =
                adminctl::import_request(found.boxes.iter().map(|b| (b.id, b.data.as_slice())));
            let reply = adminctl::send(admin, &request, ADMIN_TIMEOUT)?;
            println!("{reply}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Takeover { admin } => {
            let reply = adminctl::send(admin, b"TAKEOVER\n", ADMIN_TIMEOUT)?;
            println!("{reply}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { admin } => {
            let reply = adminctl::send(admin, b"STATUS\n", ADMIN_TIMEOUT)?;
            println!("{reply}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
