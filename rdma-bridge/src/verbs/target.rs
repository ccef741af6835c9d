//! The target (bridge) side of the verbs transport (feature `verbs`): [`VerbsTarget`] registers
//! guest ranges as memory regions with least privilege and accepts monitors' queue pairs.

use std::ptr::NonNull;

use ibverbs_sys as ffi;

use super::connect::{check_end, validate_name};
use super::ibv::{flags_i32, last_os_error, random_psn, Base, Mr, Qp};
use super::{Access, Endpoint, RegionInfo, VerbsError, MAX_MONITORS, MAX_REGIONS};

/// Upper bound of the RDMA READs a target QP answers concurrently (capped by the device).
const TARGET_MAX_DEST_RD_ATOMIC: u8 = 16;

/// A guest-physical range to expose, as the target's host mapping of it.
#[derive(Debug, Clone)]
pub struct RegionSpec {
    /// Name shown to monitors (1..=32 bytes of printable ASCII, unique).
    pub name: String,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Host address of the first byte, inside the caller's mapping of the guest-memory memfd.
    pub host: NonNull<u8>,
    /// Length in bytes.
    pub len: usize,
    /// The one remote right monitors get.
    pub access: Access,
}

/// One connected monitor on the target side.
struct Peer {
    qp: Qp,
}

/// The target (bridge) side: registers guest ranges and accepts monitors' queue pairs.
///
/// Fields drop in declaration order: the monitors' QPs, then the memory regions, then the CQ, PD
/// and device context.
pub struct VerbsTarget {
    peers: Vec<Peer>,
    mrs: Vec<Mr>,
    regions: Vec<RegionInfo>,
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
            .field("regions", &self.regions)
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
            mrs: Vec::new(),
            regions: Vec::new(),
            base: Base::open(device, 16)?,
        })
    }

    /// Name of the device in use.
    pub fn device_name(&self) -> &str {
        &self.base.dev.name
    }

    /// The regions registered so far, as monitors see them.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// Registers guest ranges as memory regions, zero copy on the host mapping, each with only the
    /// remote right its spec names. All or nothing: on error none of `specs` stays registered.
    /// Must be called before the first [`VerbsTarget::accept`].
    ///
    /// # Safety
    ///
    /// For every spec, `[host, host + len)` must be a mapping that stays valid (mapped, and not
    /// reused for anything else) until this `VerbsTarget` is dropped, and the process must hold no
    /// Rust references (`&`/`&mut`) into it while the target lives: remote monitors write
    /// `RemoteWrite` ranges at any time, and the kernel pins the pages. bdvmm's guest-memory mapping
    /// of its memfd, accessed only through volatile/raw-pointer copies, satisfies this.
    pub unsafe fn register(
        &mut self,
        specs: Vec<RegionSpec>,
    ) -> Result<Vec<RegionInfo>, VerbsError> {
        if !self.peers.is_empty() {
            return Err(VerbsError::RegisterAfterAccept);
        }
        let total = self.regions.len().saturating_add(specs.len());
        if total > MAX_REGIONS {
            return Err(VerbsError::TooManyRegions { count: total });
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
            let dup = self.regions.iter().any(|r| r.name == s.name)
                || specs[..i].iter().any(|o| o.name == s.name);
            if dup {
                return Err(VerbsError::DuplicateName {
                    name: s.name.clone(),
                });
            }
        }
        let mut new_mrs = Vec::with_capacity(specs.len());
        let mut infos = Vec::with_capacity(specs.len());
        for s in specs {
            // SAFETY: the PD is valid; the caller guarantees [host, host + len) is a live mapping
            // that outlives this target (see `# Safety`). The kernel pins the pages; the MR grants
            // only `s.access`'s remote right. On error, `new_mrs` is dropped and deregisters what
            // this call registered.
            let mr = unsafe {
                ffi::ibv_reg_mr(
                    self.base.pd.0.as_ptr(),
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
            infos.push(RegionInfo {
                name: s.name,
                gpa: s.gpa,
                len: s.len as u64,
                remote_addr: addr,
                rkey,
                access: s.access,
            });
            new_mrs.push(mr);
        }
        self.mrs.extend(new_mrs);
        self.regions.extend(infos.iter().cloned());
        Ok(infos)
    }

    /// Creates and connects an RC queue pair for one monitor and returns this side's endpoint (to
    /// send back with [`encode_connect`](super::encode_connect) and [`VerbsTarget::regions`]). The
    /// QP allows only the remote rights that some registered region grants.
    pub fn accept(&mut self, remote: Endpoint) -> Result<Endpoint, VerbsError> {
        remote.validate()?;
        if self.regions.is_empty() {
            return Err(VerbsError::NoRegions);
        }
        if self.peers.len() >= MAX_MONITORS {
            return Err(VerbsError::TooManyMonitors);
        }
        let access = self
            .regions
            .iter()
            .fold(ffi::ibv_access_flags(0), |acc, r| acc | r.access.qp_flags());
        let qp = self.base.create_qp(1)?;
        let psn = random_psn();
        let max_dest = TARGET_MAX_DEST_RD_ATOMIC.min(self.base.dev.max_qp_rd_atom);
        // On error `qp` is dropped and destroyed.
        self.base
            .connect_qp(&qp, access, psn, &remote, 1, max_dest)?;
        let local = self.base.local_endpoint(&qp, psn);
        self.peers.push(Peer { qp });
        Ok(local)
    }

    /// Disconnects the monitor whose connection has local QP number `qp_num` (the `qp_num` of the
    /// endpoint [`VerbsTarget::accept`] returned). Returns whether there was one.
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
