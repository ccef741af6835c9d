//! The monitor side of the verbs transport (feature `verbs`): [`VerbsMonitor`] connects to one
//! target and reads and writes its regions with one-sided RDMA, checking every access against the
//! region table first.

use std::ffi::CStr;
use std::io;
use std::ptr::{self, NonNull};
use std::time::{Duration, Instant};

use ibverbs_sys as ffi;

use super::connect::validate_regions;
use super::ibv::{errno_error, flags_i32, last_os_error, random_psn, Base, Pd, Qp};
use super::{
    Access, Endpoint, RegionInfo, VerbsError, BOUNCE_LEN, DEFAULT_OP_TIMEOUT, MAX_TRANSFER,
};

/// Completions polled at once.
const POLL_BATCH: usize = 4;
/// [`POLL_BATCH`] as the `int` `ibv_poll_cq` takes.
const POLL_BATCH_I32: i32 = 4;
const _: () = assert!(POLL_BATCH_I32 as usize == POLL_BATCH);
/// Polls spun before the wait loop starts sleeping between polls.
const SPIN_POLLS: u32 = 2_000;
/// Sleep between polls once spinning is over.
const POLL_SLEEP: Duration = Duration::from_micros(20);

impl RegionInfo {
    /// The target address of `[gpa, gpa + len)` if this region contains it and grants `access`.
    fn translate(&self, access: Access, gpa: u64, len: u64) -> Option<u64> {
        if self.access != access || gpa < self.gpa {
            return None;
        }
        let offset = gpa - self.gpa;
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        self.remote_addr.checked_add(offset)
    }
}

/// The monitor's registered bounce buffer. Owns its allocation; deregisters, then frees, on drop.
struct Bounce {
    mr: NonNull<ffi::ibv_mr>,
    buf: NonNull<u8>,
    len: usize,
    lkey: u32,
}

impl Bounce {
    fn new(pd: &Pd, len: usize) -> Result<Self, VerbsError> {
        let raw: *mut [u8] = Box::into_raw(vec![0u8; len].into_boxed_slice());
        let buf = NonNull::new(raw.cast::<u8>()).ok_or(VerbsError::Verb {
            verb: "allocate bounce buffer",
            source: io::Error::from(io::ErrorKind::OutOfMemory),
            hint: "the host is out of memory",
        })?;
        // SAFETY: valid PD; `buf` is a live allocation of `len` bytes owned by this Bounce until
        // drop. LOCAL_WRITE only: the target gets no right on monitor memory.
        let mr = unsafe {
            ffi::ibv_reg_mr(
                pd.0.as_ptr(),
                buf.as_ptr().cast(),
                len,
                flags_i32(ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0),
            )
        };
        let Some(mr) = NonNull::new(mr) else {
            let source = last_os_error();
            // SAFETY: `raw` came from Box::into_raw above and was never registered.
            drop(unsafe { Box::from_raw(raw) });
            return Err(VerbsError::Register {
                name: "monitor bounce buffer".to_owned(),
                len,
                source,
            });
        };
        // SAFETY: valid MR just registered.
        let lkey = unsafe { (*mr.as_ptr()).lkey };
        Ok(Bounce { mr, buf, len, lkey })
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: registered in `new`, deregistered exactly once; the QP is destroyed before (field
        // order of VerbsMonitor).
        let rc = unsafe { ffi::ibv_dereg_mr(self.mr.as_ptr()) };
        if rc != 0 {
            // The NIC might still write into the buffer: leak it rather than free it.
            tracing::warn!(error = %errno_error(rc), "ibv_dereg_mr failed; leaking the bounce buffer");
            return;
        }
        let raw = ptr::slice_from_raw_parts_mut(self.buf.as_ptr(), self.len);
        // SAFETY: `raw` is the Box<[u8]> leaked in `new`, freed exactly once, no longer registered.
        drop(unsafe { Box::from_raw(raw) });
    }
}

/// Connection state of a monitor.
#[derive(Debug)]
enum LinkState {
    /// QP created, not connected yet.
    Created,
    /// Ready for READ/WRITE.
    Connected,
    /// A timeout or failed completion moved the QP to the error state.
    Broken(String),
}

/// The monitor side: connects to one target and reads/writes its regions with one-sided RDMA.
///
/// Fields drop in declaration order: the QP, then the bounce buffer, the PD, then the CQ and device.
pub struct VerbsMonitor {
    qp: Qp,
    bounce: Bounce,
    _pd: Pd,
    regions: Vec<RegionInfo>,
    state: LinkState,
    psn: u32,
    next_wr_id: u64,
    timeout: Duration,
    base: Base,
}

// SAFETY: libibverbs objects may be used from any thread, all handles and the bounce buffer are
// owned exclusively by this value, and every operation takes `&mut self`.
unsafe impl Send for VerbsMonitor {}

impl std::fmt::Debug for VerbsMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsMonitor")
            .field("device", &self.base.dev.name)
            .field("qp_num", &self.qp.num())
            .field("state", &self.state)
            .field("regions", &self.regions)
            .finish()
    }
}

impl VerbsMonitor {
    /// Opens `device` (or the first device when `None`), creates the queue pair and registers the
    /// bounce buffer. Fails with [`VerbsError::NoDevice`] on a host without RDMA devices.
    pub fn open(device: Option<&str>) -> Result<Self, VerbsError> {
        let base = Base::open(device, 16)?;
        let pd = base.alloc_pd()?;
        let qp = base.create_qp(&pd, 4)?;
        let bounce = Bounce::new(&pd, BOUNCE_LEN)?;
        Ok(VerbsMonitor {
            qp,
            bounce,
            _pd: pd,
            regions: Vec::new(),
            state: LinkState::Created,
            psn: random_psn(),
            next_wr_id: 1,
            timeout: DEFAULT_OP_TIMEOUT,
            base,
        })
    }

    /// Name of the device in use.
    pub fn device_name(&self) -> &str {
        &self.base.dev.name
    }

    /// This side's endpoint, to send to the target with
    /// [`encode_connect`](super::encode_connect) (no regions).
    pub fn local_endpoint(&self) -> Endpoint {
        self.base.local_endpoint(&self.qp, self.psn)
    }

    /// The target's region table (after [`VerbsMonitor::connect`]).
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// Sets how long one READ/WRITE chunk may wait for its completion.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Connects to the target's endpoint and adopts its region table (both from the target's
    /// connect blob). The monitor's QP grants the target no remote right.
    pub fn connect(
        &mut self,
        remote: Endpoint,
        regions: Vec<RegionInfo>,
    ) -> Result<(), VerbsError> {
        match &self.state {
            LinkState::Created => {}
            LinkState::Connected => return Err(VerbsError::AlreadyConnected),
            LinkState::Broken(reason) => {
                return Err(VerbsError::Broken {
                    reason: reason.clone(),
                })
            }
        }
        validate_regions(&regions)?;
        let max_rd_atomic = 1;
        if let Err(e) = self.base.connect_qp(
            &self.qp,
            ffi::ibv_access_flags(0),
            self.psn,
            &remote,
            max_rd_atomic,
            1,
        ) {
            // A half-modified QP cannot be taken through INIT again without a reset: poison it.
            self.state = LinkState::Broken(e.to_string());
            return Err(e);
        }
        self.regions = regions;
        self.state = LinkState::Connected;
        Ok(())
    }

    /// Reads `len` bytes of guest-physical memory at `gpa` with one-sided RDMA READs.
    ///
    /// `[gpa, gpa + len)` must lie inside one `RemoteRead` region, else
    /// [`VerbsError::OutOfRegion`] is returned and nothing is sent.
    pub fn read(&mut self, gpa: u64, len: usize) -> Result<Vec<u8>, VerbsError> {
        let (remote_addr, rkey) = self.check(Access::RemoteRead, gpa, len)?;
        let mut out = Vec::with_capacity(len);
        let mut done = 0usize;
        while done < len {
            let chunk = (len - done).min(self.bounce.len);
            self.transfer(
                ffi::ibv_wr_opcode::IBV_WR_RDMA_READ,
                "READ",
                remote_addr + done as u64,
                rkey,
                chunk,
            )?;
            // SAFETY: the READ completed successfully, so the NIC has finished writing the first
            // `chunk` (≤ bounce.len) bytes of the bounce buffer and nothing else is outstanding.
            let data = unsafe { std::slice::from_raw_parts(self.bounce.buf.as_ptr(), chunk) };
            out.extend_from_slice(data);
            done += chunk;
        }
        Ok(out)
    }

    /// Writes `bytes` to guest-physical memory at `gpa` with one-sided RDMA WRITEs.
    ///
    /// `[gpa, gpa + bytes.len())` must lie inside one `RemoteWrite` region, else
    /// [`VerbsError::OutOfRegion`] is returned and nothing is sent.
    pub fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), VerbsError> {
        let (remote_addr, rkey) = self.check(Access::RemoteWrite, gpa, bytes.len())?;
        for (i, piece) in bytes.chunks(self.bounce.len).enumerate() {
            // SAFETY: no work request is outstanding (each transfer waits for its completion), so
            // the NIC does not touch the bounce buffer; `piece.len()` ≤ bounce.len.
            unsafe {
                ptr::copy_nonoverlapping(piece.as_ptr(), self.bounce.buf.as_ptr(), piece.len())
            };
            let offset = (i * self.bounce.len) as u64;
            self.transfer(
                ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                "WRITE",
                remote_addr + offset,
                rkey,
                piece.len(),
            )?;
        }
        Ok(())
    }

    /// Reads `len` bytes at the target's address `remote_addr` with `rkey`, **without** checking the
    /// region table: what a hostile monitor could post with a guessed or stolen rkey. For
    /// isolation checks (`bd-verbs-check`): the target's NIC must refuse what the bridge did not
    /// grant this monitor's queue pair. A refusal breaks the connection like any failed completion.
    pub fn read_raw(
        &mut self,
        remote_addr: u64,
        rkey: u32,
        len: usize,
    ) -> Result<Vec<u8>, VerbsError> {
        self.check_connected()?;
        let len = len.min(self.bounce.len);
        self.transfer(
            ffi::ibv_wr_opcode::IBV_WR_RDMA_READ,
            "READ",
            remote_addr,
            rkey,
            len,
        )?;
        // SAFETY: the READ completed successfully: the NIC wrote the first `len` (≤ bounce.len)
        // bytes of the bounce buffer and nothing else is outstanding.
        let data = unsafe { std::slice::from_raw_parts(self.bounce.buf.as_ptr(), len) };
        Ok(data.to_vec())
    }

    /// Writes `bytes` (at most [`BOUNCE_LEN`]) at the target's address `remote_addr` with `rkey`,
    /// **without** checking the region table; see [`VerbsMonitor::read_raw`].
    pub fn write_raw(
        &mut self,
        remote_addr: u64,
        rkey: u32,
        bytes: &[u8],
    ) -> Result<(), VerbsError> {
        self.check_connected()?;
        if bytes.len() > self.bounce.len {
            return Err(VerbsError::TransferTooLarge { len: bytes.len() });
        }
        // SAFETY: no work request is outstanding, so the NIC does not touch the bounce buffer;
        // `bytes.len()` ≤ bounce.len.
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), self.bounce.buf.as_ptr(), bytes.len()) };
        self.transfer(
            ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            "WRITE",
            remote_addr,
            rkey,
            bytes.len(),
        )
    }

    /// Fails unless connected and not broken.
    fn check_connected(&self) -> Result<(), VerbsError> {
        match &self.state {
            LinkState::Connected => Ok(()),
            LinkState::Created => Err(VerbsError::NotConnected),
            LinkState::Broken(reason) => Err(VerbsError::Broken {
                reason: reason.clone(),
            }),
        }
    }

    /// Checks state and region table; returns the target address and rkey of the access.
    fn check(&self, access: Access, gpa: u64, len: usize) -> Result<(u64, u32), VerbsError> {
        self.check_connected()?;
        if len > MAX_TRANSFER {
            return Err(VerbsError::TransferTooLarge { len });
        }
        self.regions
            .iter()
            .find_map(|r| Some((r.translate(access, gpa, len as u64)?, r.rkey)))
            .ok_or(VerbsError::OutOfRegion { access, gpa, len })
    }

    /// Posts one signalled RDMA READ/WRITE between the bounce buffer and the target and waits for
    /// its completion. Any failure breaks the connection.
    fn transfer(
        &mut self,
        opcode: ffi::ibv_wr_opcode::Type,
        op: &'static str,
        remote_addr: u64,
        rkey: u32,
        len: usize,
    ) -> Result<(), VerbsError> {
        let wr_id = self.next_wr_id;
        self.next_wr_id = self.next_wr_id.wrapping_add(1);
        let mut sge = ffi::ibv_sge {
            addr: self.bounce.buf.as_ptr() as u64,
            length: u32::try_from(len).map_err(|_| VerbsError::TransferTooLarge { len })?,
            lkey: self.bounce.lkey,
        };
        let mut wr = ffi::ibv_send_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
            opcode,
            send_flags: ffi::ibv_send_flags::IBV_SEND_SIGNALED.0,
            ..Default::default()
        };
        wr.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey };
        let mut bad: *mut ffi::ibv_send_wr = ptr::null_mut();
        let qp = self.qp.0.as_ptr();
        // SAFETY: `qp` is valid and its context pointer is set by libibverbs at creation.
        let post = unsafe { (*(*qp).context).ops.post_send };
        let Some(post) = post else {
            return Err(self.broken(VerbsError::Verb {
                verb: "ibv_post_send",
                source: io::Error::from(io::ErrorKind::Unsupported),
                hint: "the device provider has no post_send; the driver is broken",
            }));
        };
        // SAFETY: `qp` is valid; `wr` and `sge` live across the call (the provider copies them
        // into its send queue); the sge covers `len` bytes of the registered bounce buffer.
        let rc = unsafe { post(qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(self.broken(VerbsError::Verb {
                verb: "ibv_post_send",
                source: errno_error(rc),
                hint: "the send queue is full or the queue pair is in the error state; reconnect",
            }));
        }
        self.wait(wr_id, op)
    }

    /// Polls the CQ until the completion of `wr_id` arrives or the timeout expires.
    fn wait(&mut self, wr_id: u64, op: &'static str) -> Result<(), VerbsError> {
        let cq = self.base.cq.0.as_ptr();
        // SAFETY: `cq` is valid and its context pointer is set by libibverbs at creation.
        let poll = unsafe { (*(*cq).context).ops.poll_cq };
        let Some(poll) = poll else {
            return Err(self.broken(VerbsError::Verb {
                verb: "ibv_poll_cq",
                source: io::Error::from(io::ErrorKind::Unsupported),
                hint: "the device provider has no poll_cq; the driver is broken",
            }));
        };
        let deadline = Instant::now() + self.timeout;
        let mut polls = 0u32;
        let mut wcs = [ffi::ibv_wc::default(); POLL_BATCH];
        loop {
            // SAFETY: `cq` is valid; `wcs` has room for POLL_BATCH completions.
            let n = unsafe { poll(cq, POLL_BATCH_I32, wcs.as_mut_ptr()) };
            let n = match usize::try_from(n) {
                Ok(n) => n.min(POLL_BATCH),
                Err(_) => {
                    return Err(self.broken(VerbsError::Verb {
                        verb: "ibv_poll_cq",
                        source: io::Error::other(format!("returned {n}")),
                        hint: "the completion queue overran or the device failed; reconnect",
                    }))
                }
            };
            for wc in &wcs[..n] {
                if wc.wr_id() != wr_id {
                    tracing::warn!(
                        got = wc.wr_id(),
                        expected = wr_id,
                        "ignoring a stale work completion"
                    );
                    continue;
                }
                return match wc.error() {
                    None => Ok(()),
                    Some((code, vendor_err)) => Err(self.broken(VerbsError::Completion {
                        op,
                        status: status_text(code),
                        code,
                        vendor_err,
                        hint: status_hint(code),
                    })),
                };
            }
            if Instant::now() >= deadline {
                return Err(self.broken(VerbsError::Timeout {
                    op,
                    after: self.timeout,
                }));
            }
            polls = polls.saturating_add(1);
            if polls < SPIN_POLLS {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(POLL_SLEEP);
            }
        }
    }

    /// Marks the connection broken (moving the QP to the error state) and returns `e`.
    fn broken(&mut self, e: VerbsError) -> VerbsError {
        if !matches!(self.state, LinkState::Broken(_)) {
            self.qp.set_error();
            self.state = LinkState::Broken(e.to_string());
        }
        e
    }
}

fn status_text(code: u32) -> String {
    // SAFETY: ibv_wc_status_str accepts any value and returns a static NUL-terminated string (or
    // null, handled).
    let p = unsafe { ffi::ibv_wc_status_str(code) };
    if p.is_null() {
        return format!("status {code}");
    }
    // SAFETY: non-null static C string from libibverbs.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn status_hint(code: u32) -> &'static str {
    use ffi::ibv_wc_status as s;
    match code {
        s::IBV_WC_REM_ACCESS_ERR => {
            "the target refused the access (rkey, range or rights): the region table is stale or \
             the bridge revoked it"
        }
        s::IBV_WC_RETRY_EXC_ERR => {
            "the target did not answer: it is down, unreachable, or its queue pair was released"
        }
        s::IBV_WC_REM_INV_REQ_ERR => {
            "the target's queue pair does not allow this operation (no region grants it)"
        }
        s::IBV_WC_WR_FLUSH_ERR => "the queue pair was already in the error state",
        _ => "see ibv_poll_cq(3) for this status",
    }
}

/// The verbs data path as a [`crate::client::Transport`]: the same page cache and introspection
/// that run over the TLS channel run over one-sided RDMA.
impl crate::client::Transport for VerbsMonitor {
    fn read_mem(&mut self, gpa: u64, len: u32) -> Result<Vec<u8>, introspect::mem::MemError> {
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        self.read(gpa, n)
            .map_err(|e| mem_error(gpa, u64::from(len), &e))
    }

    fn write_mem(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), introspect::mem::MemError> {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        self.write(gpa, bytes).map_err(|e| mem_error(gpa, len, &e))
    }
}

fn mem_error(gpa: u64, len: u64, e: &VerbsError) -> introspect::mem::MemError {
    match e {
        VerbsError::OutOfRegion { .. } => introspect::mem::MemError::OutOfRange { gpa, len },
        _ => introspect::mem::MemError::Remote(format!("{gpa:#x}+{len:#x}: RDMA: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translate_checks_containment_and_access() {
        let r = RegionInfo {
            name: "tasks".to_owned(),
            gpa: 0x20_0000,
            len: 0x1000,
            remote_addr: 0x7f00_0000_0000 + 0x20_0000,
            rkey: 0x1234_5678,
            access: Access::RemoteRead,
        };
        assert_eq!(
            r.translate(Access::RemoteRead, 0x20_0000, 0x1000),
            Some(r.remote_addr)
        );
        assert_eq!(
            r.translate(Access::RemoteRead, 0x20_0ff0, 0x10),
            Some(r.remote_addr + 0xff0)
        );
        assert_eq!(r.translate(Access::RemoteRead, 0x20_0ff0, 0x11), None);
        assert_eq!(r.translate(Access::RemoteRead, 0x1f_ffff, 1), None);
        assert_eq!(r.translate(Access::RemoteWrite, 0x20_0000, 1), None);
        assert_eq!(r.translate(Access::RemoteRead, u64::MAX, 2), None);
    }
}
