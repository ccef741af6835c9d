//! The RDMA verbs transport of the bridge (cargo feature `verbs`).
//!
//! The connect blob ([`connect`]: [`encode_connect`], [`decode_connect`], [`Endpoint`],
//! [`RegionInfo`]) and [`VerbsError`] are built without the feature too: the codec parses untrusted
//! peer input, and is unit tested and fuzzed (`rdma-bridge/fuzz`, target `connect_decode`) on hosts
//! without libibverbs. Everything that touches a device needs the feature.
//!
//! | file | job | feature |
//! |---|---|---|
//! | `connect.rs` | the connect blob: its format, limits, [`Endpoint`], [`RegionInfo`], the codec | always |
//! | `error.rs` | [`VerbsError`], the one error type of the transport | always |
//! | `ibv.rs` | RAII wrappers around `ibverbs-sys`: device context, PD, CQ, QP, MR; QP connection | `verbs` |
//! | `target.rs` | the target (bridge) side: [`VerbsTarget`], a PD per monitor connection | `verbs` |
//! | `monitor.rs` | the monitor side: [`VerbsMonitor`] | `verbs` |
//!
//! # Design
//!
//! The bridge speaks two channels to a monitor. The TCP (TLS) **control channel** ([`crate::wire`])
//! authenticates the monitor, takes and releases the pause lock (LOCK/UNLOCK) and negotiates the verbs
//! connection; the **data path** is one-sided RDMA: the monitor's NIC reads and writes guest memory
//! without any bridge or guest CPU being involved, which is the point of the paper's backdoor.
//!
//! ```text
//!  monitor (VerbsMonitor)                         target (VerbsTarget, inside the bridge)
//!  open(), local_endpoint() ──── RDMA_CONNECT(blob: monitor endpoint, 0 regions) ───►
//!                                                 accept(endpoint, that monitor's grant): new PD,
//!                                                 its MRs, RC QP (remote read only) INIT→RTR→RTS
//!  connect(target endpoint, ◄─── RDMA_CONNECT ok(blob: target endpoint, region table) ──
//!          region table): INIT→RTR→RTS
//!  read(gpa, len) ═══════════ one-sided RDMA READ (rkey of a RemoteRead region) ══════► guest RAM
//!                 ─── LOCK ──►                    set_remote_write(qp, true): RTS→RTS
//!  write(gpa, bytes) ════════ one-sided RDMA WRITE (rkey of a RemoteWrite region) ════► repair hook
//!                 ─── UNLOCK ─►                   set_remote_write(qp, false)  (also at lease end)
//!  (TLS session ends)                             release(qp): QP, MRs, PD destroyed
//! ```
//!
//! The blob is [`encode_connect`]'s byte format (see [`connect`]); it travels as the opaque payload
//! of the control channel's `RDMA_CONNECT` frame.
//!
//! **Target side: one protection domain per monitor connection.** Guest memory is a host mapping
//! of the memfd that bdvmm owns. [`VerbsTarget::accept`] allocates a protection domain (PD) for
//! that one connection and registers in it exactly that monitor's grant, *directly on the mapping*
//! (zero copy, no bounce buffer on the target): each range it may read as a memory region whose
//! only remote right is REMOTE_READ, each repair-hook range it may write with REMOTE_WRITE only
//! (verbs require LOCAL_WRITE with it). Nothing is registered with REMOTE_ATOMIC. The queue pair is
//! created in the same PD, with REMOTE_READ if some region grants it and **never** REMOTE_WRITE at
//! connect time. The NIC enforces the rest (ReDMArk's mitigations; rxe's responder checks both):
//!
//! * an rkey names a memory region of one PD; a request on a queue pair of another PD is refused
//!   with a remote access error, so an rkey handed to (or guessed from) another monitor is useless;
//! * the queue pair's access flags are checked on every request: a WRITE while the QP lacks
//!   REMOTE_WRITE is refused with an invalid-request error. [`VerbsTarget::set_remote_write`]
//!   adds or removes it in place (`ibv_modify_qp` RTS → RTS with `IBV_QP_ACCESS_FLAGS`, an optional
//!   attribute of that transition for RC). The bridge (`crate::rdma`) opens this *write window*
//!   only while the monitor holds an unexpired pause lock and closes it on UNLOCK, RESTART, session
//!   end and lease expiry; with `agreement.k > 1` it registers no write region at all;
//! * an access outside every region, or with the wrong right, fails likewise.
//!
//! A refused request moves both queue pairs to the error state: a hostile or buggy monitor breaks
//! only its own connection, and reconnects with a new `RDMA_CONNECT` (which releases the old one).
//! [`VerbsTarget::release`] destroys a connection's queue pair, deregisters its regions and frees
//! its PD; the bridge calls it when the TLS session ends and on replacement, caps queue pairs per
//! monitor (`rdma::MAX_QPS_PER_MONITOR`) and per bridge ([`MAX_MONITORS`]).
//!
//! What the bridge cannot see: individual one-sided READs and WRITEs never reach the bridge's CPU,
//! so they are not in the audit log. They are bounded by what is: the ranges and rights registered
//! for that monitor (`rdma_connected`), the write window (`rdma_write_open`/`rdma_write_closed`,
//! inside an audited lock), and the connection's life (`rdma_released`, inside an audited session).
//!
//! **Monitor side.** The monitor checks every access against the region table *before* touching the
//! wire: `[gpa, gpa + len)` must lie inside one region with the right access, else the call fails
//! with [`VerbsError::OutOfRegion`] and nothing is posted. Data moves through one local bounce buffer
//! ([`BOUNCE_LEN`], registered with LOCAL_WRITE only: the target has no right on monitor memory);
//! larger transfers are split into chunks. Every work request is signalled and the completion queue
//! is polled with a deadline ([`DEFAULT_OP_TIMEOUT`], see [`VerbsMonitor::set_timeout`]): a call never
//! hangs. After a timeout or a failed completion the monitor's QP is moved to the error state and the
//! monitor is *broken*: every later call fails with [`VerbsError::Broken`] and the caller reconnects
//! with a new [`VerbsMonitor`] over the control channel.
//!
//! # Why raw `ibverbs-sys` calls and not the `ibverbs` crate's safe API
//!
//! The `ibverbs` crate (0.9) is used for device discovery ([`devices_available`]) and its
//! [`ibverbs::QueuePairEndpoint`] converts to and from [`Endpoint`]. Its safe API cannot serve the data
//! path: `ProtectionDomain::allocate` registers only a `Vec` it allocates itself, always with
//! LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ | REMOTE_ATOMIC (both wrong for us: we need zero-copy
//! registration of the guest mapping, and least privilege); `QueuePair` posts only SEND/RECV, not
//! RDMA READ/WRITE; the raw `ibv_context`/`ibv_pd`/`ibv_qp` handles are private, so the two cannot be
//! mixed; and its `Drop` impls panic when the device reports an error. The crate does not re-export
//! its FFI module, so this module calls `ibverbs-sys` (the same version the crate links, so nothing
//! extra is built) through small RAII wrappers (device context, PD, CQ, QP, MR) that never
//! panic, with a `// SAFETY:` note on every `unsafe` block. `ibv_post_send` and `ibv_poll_cq` are
//! `static inline` in `verbs.h` (not exported symbols); like the crate, we call the provider's
//! function pointers in `ibv_context.ops`.
//!
//! Registration of foreign memory is why [`VerbsTarget::accept`] is an `unsafe fn`: the caller
//! promises that the ranges stay mapped while the target lives and that nothing in the process holds
//! Rust references into them (the guest and the remote monitors change them behind the compiler's
//! back, exactly like the guest already does; bdvmm treats guest memory as volatile).
//!
//! # Host requirements
//!
//! `ibverbs-sys` builds rdma-core with cmake and generates bindings with bindgen (libclang), and the
//! binary links the system `libibverbs` (Debian: `cmake pkg-config libibverbs-dev libnl-3-dev
//! libnl-route-3-dev libclang-dev`, see `scripts/install-deps.sh`). At run time an RDMA device is needed
//! (a NIC, or SoftRoCE: `rdma link add rxe0 type rxe netdev eth0`); without one, [`VerbsTarget::open`]
//! and [`VerbsMonitor::open`] return [`VerbsError::NoDevice`] and the TCP transport is the fallback.
//! Registration pins memory: the process needs a large enough `ulimit -l` (RLIMIT_MEMLOCK) or
//! CAP_IPC_LOCK. Port 1 of the device is used. Register `MAP_SHARED` mappings (the memfd): a
//! read-only registration of a private (copy-on-write) mapping can pin pages the process later
//! replaces. bdvmm starts its helpers with `std::process::Command` (fork + exec), so `ibv_fork_init`
//! is not needed.

// Without the feature only the connect blob and the error type are built; the transport items that
// these docs link to are not, so their links cannot resolve there.
#![cfg_attr(not(feature = "verbs"), allow(rustdoc::broken_intra_doc_links))]

use std::time::Duration;

pub mod connect;
mod error;
#[cfg(feature = "verbs")]
mod ibv;
#[cfg(feature = "verbs")]
mod monitor;
#[cfg(feature = "verbs")]
mod target;

pub use connect::{
    decode_connect, encode_connect, Access, Endpoint, RegionInfo, CONNECT_HEADER_LEN,
    CONNECT_MAGIC, CONNECT_VERSION, MAX_CONNECT_LEN, MAX_NAME_LEN, MAX_REGIONS, REGION_RECORD_LEN,
};
pub use error::VerbsError;
#[cfg(feature = "verbs")]
pub use ibv::devices_available;
#[cfg(feature = "verbs")]
pub use monitor::VerbsMonitor;
#[cfg(feature = "verbs")]
pub use target::{RegionSpec, VerbsTarget};

// The transport's limits. They are here, built with or without the feature, because
// [`VerbsError`]'s messages name them.

/// Most monitor connections (queue pairs, each with its own protection domain) one
/// [`VerbsTarget`] serves at a time.
pub const MAX_MONITORS: usize = 64;
/// Size of the monitor's registered bounce buffer; larger transfers are split into chunks of this.
pub const BOUNCE_LEN: usize = 1 << 20;
/// Largest single [`VerbsMonitor::read`] or [`VerbsMonitor::write`].
pub const MAX_TRANSFER: usize = 64 << 20;
/// How long a monitor waits for one work completion before it gives up.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(5);
