//! bridge-client: what a monitor needs to talk to an `rdma-bridge`, without the bridge's server
//! (and without any VMM crate).
//!
//! * [`wire`] — the binary frame format between monitors and the bridge.
//! * [`tls`] — mutual TLS with per-monitor keys, and the PKI helpers that make them.
//! * [`client`] — the session: `fetch_sb`, `read`, `write`, `lock`/`unlock`; the [`client::Transport`]
//!   trait (TLS here, RDMA verbs in `rdma-bridge`'s `verbs` feature) and guest memory over it with
//!   a page cache while paused ([`client::BridgeMem`]).
//! * [`nonblocking`] — the same session on tokio, for the requests a monitor makes at every sample
//!   (`FETCH_SB`, `STATUS`): one thread drives a thousand of them.
//! * [`batch`] — cutting many reads into as few batched requests as a transport allows.
//! * [`jsonl`] — the JSON-lines writer of the bridge's audit log and the monitor's event log.

pub mod batch;
pub mod client;
pub mod jsonl;
pub mod nonblocking;
pub mod tls;
pub mod wire;
