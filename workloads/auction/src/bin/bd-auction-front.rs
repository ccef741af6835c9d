//! `bd-auction-front`: the auction service's front end. Prints
//! `LISTEN client=<addr> admin=<addr>` on stdout once it accepts connections.
//!
//! Exit codes: 0 never (it serves until killed), 1 failure at start, 2 bad arguments.

use std::io::Write;
use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use auction::front::crash::{Crash, CrashPoint};
use auction::front::server::{serve_clients, Shared};
use auction::front::vip::Vip;
use auction::front::{serve_admin, Config, Front};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "bd-auction-front",
    version,
    about = "The auction front end: client sessions kept in State Boxes, exactly-once failover",
    long_about = "The auction front end. Clients speak one line per request \
        (`REQ <sid> <seq> LOGIN <user> | VIEW <item> | BID <item> <amount> | LOGOUT`); each \
        session's state lives only in this process's memory and its State Box. A standby (no \
        --primary) answers `standby` until a monitor IMPORTs the failed primary's boxes on the \
        admin port and sends TAKEOVER."
)]
struct Cli {
    /// Client listener.
    #[arg(long, default_value = "0.0.0.0:7070")]
    listen: String,
    /// Admin listener (IMPORT, TAKEOVER, STATUS).
    #[arg(long, default_value = "0.0.0.0:7071")]
    admin: String,
    /// PostgreSQL connection string, e.g. "host=10.0.0.1 user=postgres dbname=auction".
    #[arg(long)]
    db: String,
    /// This front end's name (the owner recorded on takeover).
    #[arg(long, default_value = "front")]
    name: String,
    /// Claim the service at start (otherwise: standby).
    #[arg(long)]
    primary: bool,
    /// Service IP added on takeover (and at start with --primary), A.B.C.D/NN.
    #[arg(long, requires = "dev")]
    vip: Option<String>,
    /// Device for the service IP.
    #[arg(long)]
    dev: Option<String>,
    /// The `ip` program.
    #[arg(long, default_value = "/usr/sbin/ip")]
    ip_cmd: String,
    /// The `arping` program (with leading arguments).
    #[arg(long, default_value = "/bin/busybox arping")]
    arping_cmd: String,
    /// State Box slots (most sessions at once).
    #[arg(long, default_value_t = 256)]
    slots: u32,
    /// State Box capacity in bytes.
    #[arg(long, default_value_t = 1024)]
    capacity: u32,
    /// How long a logged-out session is kept to answer a retried LOGOUT, in ms.
    #[arg(long, default_value_t = 30_000)]
    linger_ms: u64,
    /// How long to wait for the database at start, in seconds.
    #[arg(long, default_value_t = 30)]
    db_wait_s: u64,
    /// Test only: freeze (SIGSTOP itself, abort if continued) at this point of a BID.
    #[arg(long, hide = true, value_enum)]
    crash_after: Option<CrashPoint>,
    /// Test only: which BID (from 1) --crash-after applies to.
    #[arg(long, hide = true, default_value_t = 1)]
    crash_on_bid: u64,
}

fn main() -> ExitCode {
    auction::init_logging("info");
    let cli = Cli::parse();
    let vip = match (&cli.vip, &cli.dev) {
        (Some(v), Some(d)) => match Vip::new(v, d, &cli.ip_cmd, &cli.arping_cmd) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("bd-auction-front: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let cfg = Config {
        name: cli.name.clone(),
        slots: cli.slots,
        capacity: cli.capacity,
        db: cli.db.clone(),
        vip,
        crash: cli.crash_after.map(|point| Crash {
            point,
            on_bid: cli.crash_on_bid,
        }),
        linger: Duration::from_millis(cli.linger_ms),
    };
    match start(&cli, cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bd-auction-front: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why the front end could not start serving.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Front(#[from] auction::front::FrontError),
    #[error("no database within --db-wait-s: {0}")]
    Database(#[from] auction::db::DbError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the admin thread: {0}")]
    Thread(std::io::Error),
}

fn start(cli: &Cli, cfg: Config) -> Result<(), StartError> {
    let mut front = Front::new(cfg)?;
    let deadline = Instant::now() + Duration::from_secs(cli.db_wait_s);
    loop {
        match front.connect_db() {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(e) => {
                tracing::warn!("waiting for the database: {e}");
                thread::sleep(Duration::from_millis(500));
            }
        }
    }
    if cli.primary {
        let t = front.takeover()?;
        tracing::info!(epoch = t.epoch, "primary");
    }
    let listen = |addr: &str| {
        let l = TcpListener::bind(addr)?;
        let a = l.local_addr()?;
        Ok((l, a))
    };
    let (clients, ca) = listen(&cli.listen).map_err(|source| StartError::Listen {
        addr: cli.listen.clone(),
        source,
    })?;
    let (admin, aa) = listen(&cli.admin).map_err(|source| StartError::Listen {
        addr: cli.admin.clone(),
        source,
    })?;
    let front: Shared = Arc::new(Mutex::new(front));
    let admin_front = Arc::clone(&front);
    thread::Builder::new()
        .name("admin-accept".into())
        .spawn(move || serve_admin(admin_front, admin))
        .map_err(StartError::Thread)?;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "LISTEN client={ca} admin={aa}");
    let _ = out.flush();
    tracing::info!(%ca, %aa, "listening");
    serve_clients(front, clients);
    Ok(())
}
