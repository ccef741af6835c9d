//! A RUBiS-like auction service whose client sessions live in State Boxes.
//!
//! The front end (`bd-auction-front`) keeps every session's state only in its own memory and in a
//! State Box; a monitor that finds the front end's machine failed extracts the boxes, IMPORTs them
//! into a standby front end and tells it to TAKEOVER. The modules:
//! - [`proto`]: the one-line request/reply protocol and bounded line reading;
//! - [`session`]: the session state, its encoding and the operations on it;
//! - [`db`]: the schema, the fenced BID transaction, takeover and the after-run consistency check;
//! - [`front`]: the front end (client and admin listeners, takeover, crash injection);
//! - [`client`]: the load generator that checks every reply against its own model;
//! - [`series`]: per-bucket throughput and latency from a load report, as CSV;
//! - [`extract`]: State Boxes read from a live process's memory (`/proc/<pid>/mem`);
//! - [`adminctl`]: the monitor's side of the admin protocol (IMPORT, TAKEOVER, STATUS);
//! - [`pg`]: a private PostgreSQL cluster for tests.

pub mod adminctl;
pub mod client;
pub mod db;
pub mod extract;
pub mod front;
pub mod pg;
pub mod proto;
pub mod series;
pub mod session;

/// Logs to stderr (colours on a terminal), filtered by `RUST_LOG`, else at `default`: the two
/// binaries' set-up.
pub fn init_logging(default: &str) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .init();
}
