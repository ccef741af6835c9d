//! rdma-bridge: exposes chosen guest-physical ranges and the pause lock of a bdvmm guest to remote
//! monitors (the paper's backdoor), behind the Guard. See `DESIGN.md` at the top of the project and
//! `rdma-bridge/README.md`.
//!
//! * [`wire`], [`tls`], [`client`], [`jsonl`] — the monitor's side, in the `bridge-client` crate
//!   (re-exported here); a monitor depends on that crate alone.
//! * [`config`] — the bridge's TOML config: listening address, TLS files, monitors and their grants.
//! * [`assignment`] — the fleet's assignment (`[fleet]`): which monitors may LOCK, WRITE, RESTART.
//! * [`guard`] — grants and delayed (k-of-n) write agreement.
//! * [`audit`] — the JSON-lines audit log.
//! * [`backend`] — guest memory and the pause lock from bdvmm (or a dump file).
//! * [`server`] — the TCP server.
//! * [`verbs`] — the one-sided RDMA data path (feature `verbs`); its connect-blob codec
//!   ([`verbs::connect`]) and error type are built without the feature too.
//! * [`rdma`] — the data path's server glue: per-monitor regions, queue-pair caps, the write window
//!   (built without the feature too; the device behind it needs `verbs`).

pub mod assignment;
pub mod audit;
pub mod backend;
pub mod config;
pub mod guard;
pub mod rdma;
pub mod server;
pub mod verbs;

pub use bridge_client::{client, jsonl, tls, wire};
