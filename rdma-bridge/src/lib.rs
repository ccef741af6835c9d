//! rdma-bridge: exposes chosen guest-physical ranges and the pause lock of a bdvmm guest to remote
//! monitors (the paper's backdoor), behind the Guard. See `DESIGN.md` at the top of the project and
//! `rdma-bridge/README.md`.
//!
//! * [`wire`] — the binary frame format between monitors and the bridge.
//! * [`config`] — the bridge's TOML config: listening address, TLS files, monitors and their grants.
//! * [`tls`] — mutual TLS with per-monitor keys, and the `pki` tool that makes them.
//! * [`guard`] — grants and delayed (k-of-n) write agreement.
//! * [`audit`] — the JSON-lines audit log.
//! * [`backend`] — guest memory and the pause lock from bdvmm (or a dump file).
//! * [`server`] — the TCP server.
//! * [`client`] — the monitor's library: `fetch_sb`, `read`, `write`, `lock`/`unlock`, and an
//!   introspect memory source over the bridge.
//! * [`verbs`] — the one-sided RDMA data path (feature `verbs`); its connect-blob codec
//!   ([`verbs::connect`]) and error type are built without the feature too.
//! * `rdma` (feature `verbs`) — the data path's server glue.

pub mod audit;
pub mod backend;
pub mod client;
pub mod config;
pub mod guard;
pub mod jsonl;
#[cfg(feature = "verbs")]
pub mod rdma;
pub mod server;
pub mod tls;
pub mod verbs;
pub mod wire;
