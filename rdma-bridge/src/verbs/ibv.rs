//! RAII wrappers around `ibverbs-sys` (feature `verbs`): the device context and what we learnt
//! about its port, the protection domain, completion queue, queue pairs and memory regions, and the
//! INIT → RTR → RTS connection of a queue pair. They never panic; every `unsafe` block says why it
//! is sound. Why raw `ibverbs-sys` and not the `ibverbs` crate's safe API: see [`super`].

use std::collections::hash_map::RandomState;
use std::ffi::CStr;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::ptr::{self, NonNull};

use ibverbs_sys as ffi;

use super::connect::QPN_LIMIT;
use super::{Access, Endpoint, VerbsError};

/// `IBV_MTU_1024` as the connect blob's byte (the enum's values are 1..=5).
pub(super) const MTU_1024: u8 = {
    assert!(ffi::IBV_MTU_1024 <= 5);
    ffi::IBV_MTU_1024.to_le_bytes()[0]
};

/// A verbs flag set as the `int` the C API takes. The flag enums use the low bits only, so the
/// value is the same; a set with the sign bit would be a bug in the flags we build.
pub(super) fn flags_i32(bits: u32) -> i32 {
    i32::try_from(bits).unwrap_or(i32::MAX)
}

/// The device port used (verbs ports are numbered from 1).
const PORT_NUM: u8 = 1;
/// Transport timeout exponent of our RC QPs: 4.096 µs × 2^14 ≈ 67 ms per try.
const QP_TIMEOUT: u8 = 14;
/// Retries of a lost packet (3 bits); with [`QP_TIMEOUT`] a dead peer is reported in about 0.5 s.
const QP_RETRY_CNT: u8 = 7;
/// RNR retries; RNR NAKs only concern SENDs, which this transport never uses.
const QP_RNR_RETRY: u8 = 7;
/// Minimum RNR NAK timer (12 = 0.64 ms); unused in practice, see [`QP_RNR_RETRY`].
const QP_MIN_RNR_TIMER: u8 = 12;

impl Access {
    /// The memory-region access flags: the one remote right, plus LOCAL_WRITE which verbs require
    /// with REMOTE_WRITE (local read is always implied).
    pub(super) fn mr_flags(self) -> ffi::ibv_access_flags {
        match self {
            Access::RemoteRead => ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ,
            Access::RemoteWrite => {
                ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                    | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            }
        }
    }

    /// The queue-pair access flag for this right.
    pub(super) fn qp_flags(self) -> ffi::ibv_access_flags {
        match self {
            Access::RemoteRead => ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ,
            Access::RemoteWrite => ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE,
        }
    }
}

impl From<Endpoint> for ibverbs::QueuePairEndpoint {
    /// Drops `psn` and `mtu`, which the crate's handshake fixes at 0 and the local port MTU.
    fn from(e: Endpoint) -> Self {
        ibverbs::QueuePairEndpoint {
            num: e.qp_num,
            lid: e.lid,
            gid: e.gid.map(|raw| ibverbs::Gid::from(ffi::ibv_gid { raw })),
        }
    }
}

impl From<ibverbs::QueuePairEndpoint> for Endpoint {
    /// Uses what the crate's handshake assumes: PSN 0, and MTU 1024 (valid on every port).
    fn from(e: ibverbs::QueuePairEndpoint) -> Self {
        let gid = e.gid.map(|g| {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&g.subnet_prefix().to_be_bytes());
            raw[8..].copy_from_slice(&g.interface_id().to_be_bytes());
            raw
        });
        Endpoint {
            qp_num: e.num,
            psn: 0,
            lid: e.lid,
            mtu: MTU_1024,
            gid,
        }
    }
}

/// Names of the RDMA devices on this host; empty (not an error) when the kernel has no RDMA support.
pub fn devices_available() -> Result<Vec<String>, VerbsError> {
    let list = match ibverbs::devices() {
        Ok(list) => list,
        // libibverbs reports a kernel without RDMA support (no /sys/class/infiniband) as ENOSYS.
        Err(e) if e.kind() == io::ErrorKind::Unsupported => return Ok(Vec::new()),
        Err(e) => return Err(VerbsError::DeviceList(e)),
    };
    Ok(list
        .iter()
        .map(|d| {
            d.name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect())
}

pub(super) fn last_os_error() -> io::Error {
    io::Error::last_os_error()
}

pub(super) fn errno_error(rc: i32) -> io::Error {
    // Verbs return a positive errno; some providers return -errno or -1 with errno set.
    match rc {
        -1 => io::Error::last_os_error(),
        rc => io::Error::from_raw_os_error(rc.saturating_abs()),
    }
}

pub(super) fn random_psn() -> u32 {
    // RandomState is seeded from the OS per process and varies per instance; 24 bits are enough.
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0x6264_7276);
    let low = h.finish().to_le_bytes();
    u32::from_le_bytes([low[0], low[1], low[2], low[3]]) & (QPN_LIMIT - 1)
}

/// An open device context with what we learnt about port 1. Closes the device on drop.
pub(super) struct DeviceCtx {
    ctx: NonNull<ffi::ibv_context>,
    pub(super) name: String,
    lid: u16,
    active_mtu: u8,
    /// GID table index and GID used for routing (RoCE), if any.
    gid: Option<(u8, [u8; 16])>,
    pub(super) max_mr_size: u64,
    pub(super) max_qp_rd_atom: u8,
}

impl DeviceCtx {
    fn open(wanted: Option<&str>) -> Result<Self, VerbsError> {
        let mut n: i32 = 0;
        // SAFETY: `n` is a valid out-pointer; the returned list is freed below on every path.
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        if list.is_null() {
            let e = last_os_error();
            return if e.kind() == io::ErrorKind::Unsupported {
                Err(VerbsError::NoDevice)
            } else {
                Err(VerbsError::DeviceList(e))
            };
        }
        let count = usize::try_from(n).unwrap_or(0);
        let mut names = Vec::with_capacity(count);
        let mut chosen: Option<(*mut ffi::ibv_device, String)> = None;
        for i in 0..count {
            // SAFETY: ibv_get_device_list returned an array of `n` valid device pointers.
            let dev = unsafe { *list.add(i) };
            if dev.is_null() {
                continue;
            }
            // SAFETY: `dev` is a valid device of the live list; the name is a NUL-terminated string
            // owned by the device, copied before the list is freed.
            let name_ptr = unsafe { ffi::ibv_get_device_name(dev) };
            let name = if name_ptr.is_null() {
                String::new()
            } else {
                // SAFETY: non-null, NUL-terminated, valid while the list lives.
                unsafe { CStr::from_ptr(name_ptr) }
                    .to_string_lossy()
                    .into_owned()
            };
            if chosen.is_none() && wanted.is_none_or(|w| w == name) {
                chosen = Some((dev, name.clone()));
            }
            names.push(name);
        }
        let result = match chosen {
            None if names.is_empty() => Err(VerbsError::NoDevice),
            None => Err(VerbsError::DeviceNotFound {
                name: wanted.unwrap_or_default().to_owned(),
                available: names.join(", "),
            }),
            Some((dev, name)) => {
                // SAFETY: `dev` comes from the live list; a context opened from it stays valid after
                // the list is freed (libibverbs keeps the device referenced by the context).
                let ctx = unsafe { ffi::ibv_open_device(dev) };
                NonNull::new(ctx)
                    .map(|ctx| (ctx, name))
                    .ok_or_else(|| VerbsError::Verb {
                        verb: "ibv_open_device",
                        source: last_os_error(),
                        hint: "check the permissions of /dev/infiniband/uverbs*",
                    })
            }
        };
        // SAFETY: `list` came from ibv_get_device_list and is freed exactly once; opened contexts
        // stay valid.
        unsafe { ffi::ibv_free_device_list(list) };
        let (ctx, name) = result?;
        let mut dev = DeviceCtx {
            ctx,
            name,
            lid: 0,
            active_mtu: 0,
            gid: None,
            max_mr_size: 0,
            max_qp_rd_atom: 1,
        };
        // From here on `dev` closes the context on every error path.
        dev.query()?;
        Ok(dev)
    }

    fn query(&mut self) -> Result<(), VerbsError> {
        let mut attr = ffi::ibv_device_attr::default();
        // SAFETY: valid context, `attr` is a valid out-pointer of the right type.
        let rc = unsafe { ffi::ibv_query_device(self.ctx.as_ptr(), &mut attr) };
        if rc != 0 {
            return Err(VerbsError::Verb {
                verb: "ibv_query_device",
                source: errno_error(rc),
                hint: "the device driver is not working; check `ibv_devinfo`",
            });
        }
        self.max_mr_size = attr.max_mr_size;
        self.max_qp_rd_atom = u8::try_from(attr.max_qp_rd_atom.max(1)).unwrap_or(u8::MAX);

        let mut port = ffi::ibv_port_attr::default();
        // SAFETY: valid context. The exported ibv_query_port takes the older, shorter compat layout
        // of the port attributes and fills only that prefix of our zeroed, larger struct; this is
        // exactly what verbs.h's inline wrapper does when the provider has no extended query.
        let rc = unsafe {
            ffi::ibv_query_port(
                self.ctx.as_ptr(),
                PORT_NUM,
                (&mut port as *mut ffi::ibv_port_attr).cast::<ffi::_compat_ibv_port_attr>(),
            )
        };
        if rc != 0 {
            return Err(VerbsError::Verb {
                verb: "ibv_query_port",
                source: errno_error(rc),
                hint: "the device has no port 1 or its driver is not working; check `ibv_devinfo`",
            });
        }
        match port.state {
            ffi::ibv_port_state::IBV_PORT_ACTIVE | ffi::ibv_port_state::IBV_PORT_ARMED => {}
            state => {
                return Err(VerbsError::PortNotActive {
                    device: self.name.clone(),
                    port: PORT_NUM,
                    state,
                })
            }
        }
        self.lid = port.lid;
        self.active_mtu = u8::try_from(port.active_mtu)
            .ok()
            .filter(|m| (1..=5).contains(m))
            .unwrap_or(MTU_1024);
        if u32::from(port.link_layer) == ffi::IBV_LINK_LAYER_ETHERNET || port.lid == 0 {
            self.gid = Some(self.pick_gid(&port)?);
        }
        Ok(())
    }

    /// Picks the GID to route with on RoCE: RoCE v2 with an IPv4-mapped address first (what
    /// `rdma_cm` would pick on most networks), then any RoCE v2, then any non-zero GID.
    fn pick_gid(&self, port: &ffi::ibv_port_attr) -> Result<(u8, [u8; 16]), VerbsError> {
        // grh.sgid_index is a u8, so only the first 256 entries can be used.
        let len = u32::try_from(port.gid_tbl_len).unwrap_or(0).min(256);
        let mut usable: Vec<(u8, [u8; 16], u32)> = Vec::new();
        for index in 0..len {
            let mut entry = ffi::ibv_gid_entry::default();
            // SAFETY: valid context; `entry` is a valid out-pointer of the size passed. Empty
            // entries return ENODATA, which we skip like any other failure of one entry.
            let rc = unsafe {
                ffi::_ibv_query_gid_ex(
                    self.ctx.as_ptr(),
                    u32::from(PORT_NUM),
                    index,
                    &mut entry,
                    0,
                    std::mem::size_of::<ffi::ibv_gid_entry>(),
                )
            };
            // SAFETY: a union read; every bit pattern of `ibv_gid` is a valid `[u8; 16]`.
            let gid = unsafe { entry.gid.raw };
            if rc == 0 && gid != [0; 16] {
                if let Ok(i) = u8::try_from(index) {
                    usable.push((i, gid, entry.gid_type));
                }
            }
        }
        let v4_mapped = |g: &[u8; 16]| g[..10] == [0; 10] && g[10..12] == [0xff, 0xff];
        usable
            .iter()
            .find(|(_, g, t)| *t == ffi::IBV_GID_TYPE_ROCE_V2 && v4_mapped(g))
            .or_else(|| {
                usable
                    .iter()
                    .find(|(_, _, t)| *t == ffi::IBV_GID_TYPE_ROCE_V2)
            })
            .or_else(|| usable.first())
            .map(|(i, g, _)| (*i, *g))
            .ok_or_else(|| VerbsError::NoGid {
                device: self.name.clone(),
                port: PORT_NUM,
            })
    }
}

impl Drop for DeviceCtx {
    fn drop(&mut self) {
        // SAFETY: the context was opened by ibv_open_device and every resource created from it is
        // owned by a struct field dropped before this one.
        let rc = unsafe { ffi::ibv_close_device(self.ctx.as_ptr()) };
        if rc != 0 {
            tracing::warn!(device = %self.name, error = %errno_error(rc), "ibv_close_device failed");
        }
    }
}

/// A protection domain. Deallocated on drop.
pub(super) struct Pd(pub(super) NonNull<ffi::ibv_pd>);

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_pd; its QPs and MRs are dropped before it.
        let rc = unsafe { ffi::ibv_dealloc_pd(self.0.as_ptr()) };
        if rc != 0 {
            tracing::warn!(error = %errno_error(rc), "ibv_dealloc_pd failed");
        }
    }
}

/// A completion queue. Destroyed on drop.
pub(super) struct Cq(pub(super) NonNull<ffi::ibv_cq>);

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_cq; the QPs using it are dropped before it.
        let rc = unsafe { ffi::ibv_destroy_cq(self.0.as_ptr()) };
        if rc != 0 {
            tracing::warn!(error = %errno_error(rc), "ibv_destroy_cq failed");
        }
    }
}

/// A queue pair. Destroyed on drop.
pub(super) struct Qp(pub(super) NonNull<ffi::ibv_qp>);

impl Qp {
    pub(super) fn num(&self) -> u32 {
        // SAFETY: valid QP; qp_num is set at creation and never changes.
        unsafe { (*self.0.as_ptr()).qp_num }
    }

    fn modify(
        &self,
        attr: &mut ffi::ibv_qp_attr,
        mask: ffi::ibv_qp_attr_mask,
        what: &'static str,
    ) -> Result<(), VerbsError> {
        // SAFETY: valid QP; `attr` is a fully initialised attribute struct and `mask` names only
        // the fields we set.
        let rc = unsafe { ffi::ibv_modify_qp(self.0.as_ptr(), attr, flags_i32(mask.0)) };
        if rc != 0 {
            return Err(VerbsError::Verb {
                verb: what,
                source: errno_error(rc),
                hint: "the peer's endpoint does not fit this port (LID/GID/MTU); check both sides \
                       use the same fabric",
            });
        }
        Ok(())
    }

    /// Changes the remote rights of a connected (RTS) queue pair in place: RTS → RTS with
    /// `IBV_QP_ACCESS_FLAGS`, which ibv_modify_qp(3) lists among the optional attributes of that
    /// transition for RC. The responder checks the QP's rights on every incoming request (rxe:
    /// `check_op_valid`), so a right taken away here refuses the next packet. Fails when the QP is
    /// no longer in RTS (e.g. an earlier refused request moved it to the error state).
    pub(super) fn set_access(&self, access: ffi::ibv_access_flags) -> Result<(), VerbsError> {
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            qp_access_flags: access.0,
            ..Default::default()
        };
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE | ffi::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        // SAFETY: valid QP; `attr` is fully initialised and `mask` names only the fields set.
        let rc = unsafe { ffi::ibv_modify_qp(self.0.as_ptr(), &mut attr, flags_i32(mask.0)) };
        if rc != 0 {
            return Err(VerbsError::Verb {
                verb: "ibv_modify_qp(RTS->RTS, access flags)",
                source: errno_error(rc),
                hint:
                    "the queue pair is no longer ready to send (a refused access moved it to the \
                       error state); the monitor must reconnect with RDMA_CONNECT",
            });
        }
        Ok(())
    }

    /// Moves the QP to the error state so that outstanding work requests are flushed.
    pub(super) fn set_error(&self) {
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_ERR,
            ..Default::default()
        };
        if let Err(e) = self.modify(
            &mut attr,
            ffi::ibv_qp_attr_mask::IBV_QP_STATE,
            "ibv_modify_qp(ERR)",
        ) {
            tracing::warn!(error = %e, "could not move the queue pair to the error state");
        }
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp and destroyed exactly once, before its CQ and PD.
        let rc = unsafe { ffi::ibv_destroy_qp(self.0.as_ptr()) };
        if rc != 0 {
            tracing::warn!(error = %errno_error(rc), "ibv_destroy_qp failed");
        }
    }
}

/// A memory region over memory someone else owns. Deregistered on drop.
pub(super) struct Mr(pub(super) NonNull<ffi::ibv_mr>);

impl Mr {
    pub(super) fn keys(&self) -> (u32, u32, u64) {
        // SAFETY: valid MR; lkey/rkey/addr are set at registration and never change.
        let mr = unsafe { &*self.0.as_ptr() };
        (mr.lkey, mr.rkey, mr.addr as u64)
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered by ibv_reg_mr, deregistered exactly once; the QPs that could use it
        // are destroyed before (field order of the owners).
        let rc = unsafe { ffi::ibv_dereg_mr(self.0.as_ptr()) };
        if rc != 0 {
            tracing::warn!(error = %errno_error(rc), "ibv_dereg_mr failed");
        }
    }
}

/// Device and completion queue, shared by every queue pair of one side. Protection domains are
/// not here: the target allocates one per monitor session ([`Base::alloc_pd`]), the monitor one for
/// itself. Fields drop in order: the CQ, then the device context (every PD, QP and MR made from it
/// is owned by a field that drops before).
pub(super) struct Base {
    pub(super) cq: Cq,
    pub(super) dev: DeviceCtx,
}

impl Base {
    pub(super) fn open(device: Option<&str>, cq_entries: i32) -> Result<Self, VerbsError> {
        let dev = DeviceCtx::open(device)?;
        // SAFETY: valid context; no completion channel (we poll), no CQ context pointer.
        let cq = unsafe {
            ffi::ibv_create_cq(
                dev.ctx.as_ptr(),
                cq_entries,
                ptr::null_mut(),
                ptr::null_mut(),
                0,
            )
        };
        let cq = NonNull::new(cq).map(Cq).ok_or_else(|| VerbsError::Verb {
            verb: "ibv_create_cq",
            source: last_os_error(),
            hint: "the device is out of completion queues or memory",
        })?;
        Ok(Base { cq, dev })
    }

    /// A new protection domain on this device. Memory regions and queue pairs of different
    /// protection domains cannot be combined: the responder NIC refuses a remote access whose rkey
    /// names a region outside the queue pair's PD.
    pub(super) fn alloc_pd(&self) -> Result<Pd, VerbsError> {
        // SAFETY: valid context.
        let pd = unsafe { ffi::ibv_alloc_pd(self.dev.ctx.as_ptr()) };
        NonNull::new(pd).map(Pd).ok_or_else(|| VerbsError::Verb {
            verb: "ibv_alloc_pd",
            source: last_os_error(),
            hint: "the device is out of protection domains or memory",
        })
    }

    /// A new RC queue pair in `pd`, completing on this base's CQ.
    pub(super) fn create_qp(&self, pd: &Pd, max_send_wr: u32) -> Result<Qp, VerbsError> {
        let mut init = ffi::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: self.cq.0.as_ptr(),
            recv_cq: self.cq.0.as_ptr(),
            srq: ptr::null_mut(),
            cap: ffi::ibv_qp_cap {
                max_send_wr,
                max_recv_wr: 1,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: valid PD (owned by the caller, who drops the QP before it) and CQ owned by
        // `self`; `init` is fully initialised.
        let qp = unsafe { ffi::ibv_create_qp(pd.0.as_ptr(), &mut init) };
        NonNull::new(qp).map(Qp).ok_or_else(|| VerbsError::Verb {
            verb: "ibv_create_qp",
            source: last_os_error(),
            hint: "the device is out of queue pairs or memory",
        })
    }

    pub(super) fn local_endpoint(&self, qp: &Qp, psn: u32) -> Endpoint {
        Endpoint {
            qp_num: qp.num(),
            psn,
            lid: self.dev.lid,
            mtu: self.dev.active_mtu,
            gid: self.dev.gid.map(|(_, g)| g),
        }
    }

    /// Takes a fresh QP through INIT → RTR → RTS towards `remote`.
    pub(super) fn connect_qp(
        &self,
        qp: &Qp,
        access: ffi::ibv_access_flags,
        local_psn: u32,
        remote: &Endpoint,
        max_rd_atomic: u8,
        max_dest_rd_atomic: u8,
    ) -> Result<(), VerbsError> {
        remote.validate()?;
        use ffi::ibv_qp_attr_mask as m;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: PORT_NUM,
            qp_access_flags: access.0,
            ..Default::default()
        };
        qp.modify(
            &mut attr,
            m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )?;

        let mut ah = ffi::ibv_ah_attr {
            dlid: remote.lid,
            sl: 0,
            src_path_bits: 0,
            port_num: PORT_NUM,
            ..Default::default()
        };
        match (remote.gid, self.dev.gid) {
            (Some(dgid), Some((sgid_index, _))) => {
                ah.is_global = 1;
                ah.grh.dgid = ffi::ibv_gid { raw: dgid };
                ah.grh.sgid_index = sgid_index;
                ah.grh.hop_limit = 0xff;
            }
            (None, Some(_)) => {
                return Err(VerbsError::BadEndpoint {
                    reason: "this port needs GID routing (RoCE) but the peer sent no GID",
                })
            }
            (Some(_), None) | (None, None) => {
                if remote.lid == 0 {
                    return Err(VerbsError::BadEndpoint {
                        reason: "the peer has only a GID but this port routes by LID",
                    });
                }
            }
        }
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: u32::from(self.dev.active_mtu.min(remote.mtu)),
            dest_qp_num: remote.qp_num,
            rq_psn: remote.psn,
            max_dest_rd_atomic,
            min_rnr_timer: QP_MIN_RNR_TIMER,
            ah_attr: ah,
            ..Default::default()
        };
        qp.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp(RTR)",
        )?;

        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: local_psn,
            timeout: QP_TIMEOUT,
            retry_cnt: QP_RETRY_CNT,
            rnr_retry: QP_RNR_RETRY,
            max_rd_atomic,
            ..Default::default()
        };
        qp.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTS)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_converts_to_and_from_the_crate_type() {
        let ep = Endpoint {
            qp_num: 0x00ab_cdef,
            psn: 0x0012_3456,
            lid: 7,
            mtu: 3,
            gid: Some([
                0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x02, 0x11, 0x22, 0xff, 0xfe, 0x33, 0x44, 0x55,
            ]),
        };
        let qpe: ibverbs::QueuePairEndpoint = ep.into();
        assert_eq!(qpe.num, ep.qp_num);
        assert_eq!(qpe.lid, ep.lid);
        let back = Endpoint::from(qpe);
        assert_eq!(back.gid, ep.gid);
        assert_eq!(back.qp_num, ep.qp_num);
        assert_eq!(back.psn, 0);
    }
}
