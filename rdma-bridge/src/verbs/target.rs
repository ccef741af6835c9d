//! The target (bridge) side of the verbs transport (feature `verbs`): [`VerbsTarget`] accepts
//! monitors' queue pairs, each in a protection domain of its own that holds exactly that monitor's
//! memory regions, with least privilege.

use std::ptr::NonNull;

use ibverbs_sys as ffi;

use super::connect::{check_end, validate_name};
use super::ibv::{flags_i32, last_os_error, random_psn, Base, Mr, Pd, Qp};
use super::{Access, Endpoint, RegionInfo, VerbsError, MAX_MONITORS, MAX_REGIONS};

/// Upper bound of the RDMA READs a target QP answers concurrently (capped by the device).
const TARGET_MAX_DEST_RD_ATOMIC: u8 = 16;

/// A guest-physical range to expose to one monitor, as the target's host mapping of it.
#[derive(Debug, Clone)]
pub struct RegionSpec {
    /// Name shown to the monitor (1..=32 bytes of printable ASCII, unique per connection).
    pub name: String,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Host address of the first byte, inside the caller's mapping of the guest-memory memfd.
    pub host: NonNull<u8>,
    /// Length in bytes.
    pub len: usize,
    /// The one remote right the monitor gets.
    pub access: Access,
}

/// What [`VerbsTarget::accept`] gives back: this side's endpoint and the monitor's region table
/// (to send back with [`encode_connect`](super::encode_connect)).
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The target's endpoint for this connection; its `qp_num` names the connection.
    pub endpoint: Endpoint,
    /// The regions registered for this monitor, in the order of the specs.
    pub regions: Vec<RegionInfo>,
}

/// One connected monitor on the target side: its own protection domain, the memory regions
/// registered in it (that monitor's grants only) and its queue pair.
///
/// Fields drop in declaration order: the QP, then the regions, then the PD.
struct Peer {
    qp: Qp,
    _mrs: Vec<Mr>,
    _pd: Pd,
    /// The read right (if some region grants it); the QP's rights are this, plus REMOTE_WRITE
    /// while [`VerbsTarget::set_remote_write`] has opened the write window.
    read: ffi::ibv_access_flags,
    has_write_region: bool,
}

/// The target (bridge) side: accepts monitors' queue pairs, each in its own protection domain.
///
/// Fields drop in declaration order: the monitors (QPs, regions, PDs), then the CQ and device.
pub struct VerbsTarget {
    peers: Vec<Peer>,
    base: Base,
}

// SAFETY: libibverbs objects may be used from any thread (the library is thread safe), every handle
// here is owned exclusively by this value, and the registered host ranges are only handed to the
// kernel, never dereferenced by this module.
unsafe impl Send for VerbsTarget {}

impl std::fmt::Debug for VerbsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsTarget")
            .field("device", &self.base.dev.name)
            .field("monitors", &self.peers.len())
            .finish()
    }
}

impl VerbsTarget {
    /// Opens `device` (by name, e.g. `mlx5_0` or `rxe0`), or the first device when `None`.
    ///
    /// Fails with [`VerbsError::NoDevice`] on a host without RDMA devices.
    pub fn open(device: Option<&str>) -> Result<Self, VerbsError> {
        Ok(VerbsTarget {
            peers: Vec::new(),
            base: Base::open(device, 16)?,
        })
    }

    /// Name of the device in use.
    pub fn device_name(&self) -> &str {
        &self.base.dev.name
    }

    /// Connects one monitor: allocates a protection domain for it alone, registers `specs` (that
    /// monitor's grants) in it — zero copy on the host mapping, each with only the remote right its
    /// spec names — and creates an RC queue pair in the same domain, taken INIT → RTR → RTS towards
    /// `remote`. The queue pair gets REMOTE_READ if some spec grants it, and **never** REMOTE_WRITE
    /// here: writing needs [`VerbsTarget::set_remote_write`] (the bridge opens it only while the
    /// monitor holds the pause lock). All or nothing: on error nothing of this call stays.
    ///
    /// An rkey handed to another monitor names a region of another protection domain, so the NIC
    /// refuses it on this monitor's queue pair (and vice versa).
    ///
    /// # Safety
    ///
    /// For every spec, `[host, host + len)` must be a mapping that stays valid (mapped, and not
    /// reused for anything else) until this connection is released or the target dropped, and the
    /// process must hold no Rust references (`&`/`&mut`) into it meanwhile: the remote monitor
    /// writes `RemoteWrite` ranges at any time, and the kernel pins the pages. bdvmm's guest-memory
    /// mapping of its memfd, accessed only through volatile/raw-pointer copies, satisfies this.
    pub unsafe fn accept(
        &mut self,
        remote: Endpoint,
        specs: Vec<RegionSpec>,
    ) -> Result<Accepted, VerbsError> {
        remote.validate()?;
        if specs.is_empty() {
            return Err(VerbsError::NoRegions);
        }
        if specs.len() > MAX_REGIONS {
            return Err(VerbsError::TooManyRegions { count: specs.len() });
        }
        if self.peers.len() >= MAX_MONITORS {
            return Err(VerbsError::TooManyMonitors);
        }
        for (i, s) in specs.iter().enumerate() {
            validate_name(s.name.as_bytes())?;
            if s.len == 0 {
                return Err(VerbsError::EmptyRegion {
                    name: s.name.clone(),
                });
            }
            let len = s.len as u64;
            check_end(&s.name, "gpa", s.gpa, len)?;
            check_end(&s.name, "host address", s.host.as_ptr() as u64, len)?;
            if len > self.base.dev.max_mr_size {
                return Err(VerbsError::RegionTooLarge {
                    name: s.name.clone(),
                    len,
                    max: self.base.dev.max_mr_size,
                });
            }
            if specs[..i].iter().any(|o| o.name == s.name) {
                return Err(VerbsError::DuplicateName {
                    name: s.name.clone(),
                });
            }
        }
        // Every object below is owned by a local that drops (and deregisters/destroys) it if a
        // later step fails; locals drop in reverse order: QP, then MRs, then PD.
        let pd = self.base.alloc_pd()?;
        let mut mrs = Vec::with_capacity(specs.len());
        let mut regions = Vec::with_capacity(specs.len());
        for s in specs {
            // SAFETY: the PD is valid; the caller guarantees [host, host + len) is a live mapping
            // that outlives this connection (see `# Safety`). The kernel pins the pages; the MR
            // grants only `s.access`'s remote right.
            let mr = unsafe {
                ffi::ibv_reg_mr(
                    pd.0.as_ptr(),
                    s.host.as_ptr().cast(),
                    s.len,
                    flags_i32(s.access.mr_flags().0),
                )
            };
            let mr = NonNull::new(mr)
                .map(Mr)
                .ok_or_else(|| VerbsError::Register {
                    name: s.name.clone(),
                    len: s.len,
                    source: last_os_error(),
                })?;
            let (_, rkey, addr) = mr.keys();
            regions.push(RegionInfo {
                name: s.name,
                gpa: s.gpa,
                len: s.len as u64,
                remote_addr: addr,
                rkey,
                access: s.access,
            });
            mrs.push(mr);
        }
        let read = if regions.iter().any(|r| r.access == Access::RemoteRead) {
            Access::RemoteRead.qp_flags()
        } else {
            ffi::ibv_access_flags(0)
        };
        let has_write_region = regions.iter().any(|r| r.access == Access::RemoteWrite);
        let qp = self.base.create_qp(&pd, 1)?;
        let psn = random_psn();
        let max_dest = TARGET_MAX_DEST_RD_ATOMIC.min(self.base.dev.max_qp_rd_atom);
        self.base.connect_qp(&qp, read, psn, &remote, 1, max_dest)?;
        let endpoint = self.base.local_endpoint(&qp, psn);
        self.peers.push(Peer {
            qp,
            _mrs: mrs,
            _pd: pd,
            read,
            has_write_region,
        });
        Ok(Accepted { endpoint, regions })
    }

    /// Opens (`on`) or closes the write window of the connection whose local QP number is
    /// `qp_num`: adds or removes REMOTE_WRITE on its queue pair (RTS → RTS). Opening fails with
    /// [`VerbsError::NoWriteRegion`] when no region of that connection grants writing. Returns
    /// whether the connection exists.
    pub fn set_remote_write(&mut self, qp_num: u32, on: bool) -> Result<bool, VerbsError> {
        let Some(p) = self.peers.iter().find(|p| p.qp.num() == qp_num) else {
            return Ok(false);
        };
        if on && !p.has_write_region {
            return Err(VerbsError::NoWriteRegion);
        }
        let access = if on {
            p.read | Access::RemoteWrite.qp_flags()
        } else {
            p.read
        };
        p.qp.set_access(access)?;
        Ok(true)
    }

    /// Disconnects the monitor whose connection has local QP number `qp_num` (the `qp_num` of the
    /// endpoint [`VerbsTarget::accept`] returned): destroys its queue pair, deregisters its regions
    /// and frees its protection domain. Returns whether there was one.
    pub fn release(&mut self, qp_num: u32) -> bool {
        let before = self.peers.len();
        self.peers.retain(|p| p.qp.num() != qp_num);
        self.peers.len() != before
    }

    /// Number of connected monitors.
    pub fn monitors(&self) -> usize {
        self.peers.len()
    }
}
