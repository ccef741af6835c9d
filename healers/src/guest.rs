//! One attached guest, seen through its bridge: sampling, the lock, the process table and kills.
//!
//! A session that fails is dropped and re-opened at the next call, so a bridge that restarts or a
//! network blip costs one sample, not the monitor. The guest kernel is located once per boot (the
//! Sensor Box's `boot_id` changes when the guest reboots) and reused.

use std::time::{Duration, Instant};

use bridge_client::client::{Bridge, BridgeMem, ClientError, InspectError};
use bridge_client::wire::VmStatus;
use introspect::consistency;
use introspect::forkrate::ForkRateError;
use introspect::kernel::{KernelError, Symbols};
use introspect::repair::{self, DirectLayout, KillSite, Killed, RepairError, Spared, Victims};
use introspect::sensorbox::SensorBox;
use introspect::target::{KernelFiles, Target};
use introspect::tasks::{KernelMem, Limits, Process, TaskError};
use introspect::virtual_sensors::{VirtualError, VirtualSensors};

use crate::config::GuestConfig;

/// How long the lock waits for a moment when no fork or exit holds `tasklist_lock`, before it goes
/// ahead anyway (the paper's forced lock).
pub const QUIESCE: Duration = Duration::from_millis(200);

/// Why a call on the guest failed: the session to its bridge (dropped, re-opened at the next call)
/// or what its memory holds.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The bridge cannot be reached.
    #[error("bridge {bridge}: {source}")]
    Connect {
        /// Its address.
        bridge: String,
        /// Why.
        source: ClientError,
    },
    /// The session failed or the bridge refused.
    #[error(transparent)]
    Session(#[from] ClientError),
    /// Locating the kernel over the bridge.
    #[error(transparent)]
    Inspect(#[from] InspectError),
    /// Walking the task list, or checking `tasklist_lock`.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The kernel's symbols (stock guests).
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// Virtual sensors (stock guests).
    #[error(transparent)]
    Virtual(#[from] VirtualError),
    /// The kernel's per-user fork counters.
    #[error(transparent)]
    ForkRate(#[from] ForkRateError),
    /// A kill.
    #[error(transparent)]
    Repair(#[from] RepairError),
    /// A call that needs the lock, made without it.
    #[error("lock the guest first")]
    NotLocked,
}

impl GuestError {
    /// True if the session to the bridge failed (rather than the guest's data).
    pub fn is_session(&self) -> bool {
        matches!(
            self,
            GuestError::Connect { .. }
                | GuestError::Session(_)
                | GuestError::Inspect(InspectError::Client(_))
        )
    }
}

/// A located kernel.
struct Kernel {
    boot_id: Option<u64>,
    target: Target,
    direct: DirectLayout,
    virt: Option<VirtualSensors>,
}

/// What taking the lock cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct LockInfo {
    /// Until every vCPU stopped, for the last attempt.
    pub lock_ns: u64,
    /// Attempts (1 if `tasklist_lock` was free at once).
    pub attempts: u32,
    /// Went ahead with `tasklist_lock` still held.
    pub forced: bool,
    /// When the lock was taken.
    pub at: Option<Instant>,
}

/// One guest.
pub struct Guest {
    /// Its config.
    pub cfg: GuestConfig,
    mem: Option<BridgeMem>,
    kernel: Option<Kernel>,
    locked: bool,
}

impl Guest {
    /// A guest not yet connected.
    pub fn new(cfg: GuestConfig) -> Guest {
        Guest {
            cfg,
            mem: None,
            kernel: None,
            locked: false,
        }
    }

    /// True for a stock kernel (virtual sensors).
    pub fn stock(&self) -> bool {
        self.cfg.system_map.is_some()
    }

    fn session(&mut self) -> Result<&BridgeMem, GuestError> {
        let mem = match self.mem.take() {
            Some(m) => m,
            None => BridgeMem::new(
                Bridge::connect(self.cfg.bridge.as_str(), &self.cfg.identity()).map_err(
                    |source| GuestError::Connect {
                        bridge: self.cfg.bridge.clone(),
                        source,
                    },
                )?,
            ),
        };
        Ok(self.mem.insert(mem))
    }

    /// Drops the session (it will be re-opened).
    pub fn disconnect(&mut self) {
        self.mem = None;
        self.locked = false;
    }

    fn guard<T>(&mut self, r: Result<T, GuestError>) -> Result<T, GuestError> {
        if r.is_err() {
            self.disconnect();
        }
        r
    }

    /// A Sensor Box sample: the guest's own (patched), or virtual sensors (stock).
    pub fn sample(&mut self) -> Result<SensorBox, GuestError> {
        let r = if self.stock() {
            self.virtual_sample()
        } else {
            self.session().and_then(|m| Ok(m.bridge().sensor_box()?))
        };
        self.guard(r)
    }

    fn virtual_sample(&mut self) -> Result<SensorBox, GuestError> {
        // A session dropped after an error is opened again here; the located kernel is kept (it
        // does not move while this boot runs). Without this, one failed repair left a stock
        // guest unsampled for good.
        self.session()?;
        self.ensure_kernel(None)?;
        let (Some(k), Some(mem)) = (&self.kernel, &self.mem) else {
            return Err(GuestError::NotLocked);
        };
        let Some(virt) = &k.virt else {
            return Err(VirtualError::NoSymbol("(no System.map given)").into());
        };
        Ok(virt.sample(&KernelMem::new(mem, k.target.loc.clone()))?)
    }

    /// Restarts the guest through the bridge (bdvmm reboots it in place).
    pub fn restart(&mut self) -> Result<(), GuestError> {
        let r = self.session().and_then(|m| Ok(m.bridge().restart()?));
        self.kernel = None;
        self.guard(r)
    }

    /// bdvmm's view of the vCPUs.
    pub fn status(&mut self) -> Result<VmStatus, GuestError> {
        let r = self.session().and_then(|m| Ok(m.bridge().status()?));
        self.guard(r)
    }

    /// Locates the kernel if not yet done for this boot.
    fn ensure_kernel(&mut self, sb: Option<&SensorBox>) -> Result<(), GuestError> {
        // Virtual sensors (stock guests) carry no boot id (0): that says nothing about a reboot.
        let boot_id = sb.map(|s| s.header.boot_id).filter(|&b| b != 0);
        if let Some(k) = &self.kernel {
            if boot_id.is_none() || k.boot_id == boot_id {
                return Ok(());
            }
        }
        let (map, vmlinux) = (self.cfg.system_map.clone(), self.cfg.vmlinux.clone());
        let files = match (&map, &vmlinux) {
            (Some(s), Some(v)) => Some(KernelFiles::Files {
                system_map: s,
                vmlinux: v,
            }),
            _ => None,
        };
        let mem = self.session()?;
        let target = mem.locate(files)?;
        let direct = DirectLayout::from_btf(&target.btf)?;
        let virt = match &map {
            Some(m) => {
                let syms = Symbols::from_file(m)?;
                Some(VirtualSensors::new(&syms, &target.btf, &target.loc)?)
            }
            None => None,
        };
        self.kernel = Some(Kernel {
            boot_id,
            target,
            direct,
            virt,
        });
        Ok(())
    }

    /// Takes the pause lock at a moment when no fork or exit holds `tasklist_lock` (retrying with
    /// the guest running 2 ms in between), or after [`QUIESCE`] anyway. Healers take it through
    /// [`crate::hm::HealContext::lock`], whose guard releases it.
    pub(crate) fn lock(&mut self, sb: Option<&SensorBox>) -> Result<LockInfo, GuestError> {
        let r = self.lock_inner(sb);
        self.guard(r)
    }

    fn lock_inner(&mut self, sb: Option<&SensorBox>) -> Result<LockInfo, GuestError> {
        self.ensure_kernel(sb)?;
        let lease = Duration::from_millis(self.cfg.lease_ms);
        let (Some(k), Some(mem)) = (&self.kernel, &self.mem) else {
            return Err(GuestError::NotLocked);
        };
        let mut pauser = mem.pauser(lease);
        let l = consistency::pause_quiescent(&mut pauser, QUIESCE, || {
            Ok::<_, GuestError>(k.target.tasklist_busy(mem)?)
        })?;
        let info = LockInfo {
            lock_ns: crate::events::nanos(pauser.last_lock()),
            attempts: l.attempts,
            forced: l.forced,
            at: Some(Instant::now()),
        };
        self.locked = true;
        Ok(info)
    }

    /// Releases the lock.
    pub(crate) fn unlock(&mut self) -> Result<(), GuestError> {
        if !self.locked {
            return Ok(());
        }
        self.locked = false;
        let r = self.session().and_then(|m| Ok(m.unlock()?));
        self.guard(r)
    }

    /// The process table, within the walk budget of this guest's config; the caller holds the
    /// lock (healers: [`crate::hm::Held::processes`], which also ends the walk with the lease).
    pub fn processes(&mut self) -> Result<Vec<Process>, GuestError> {
        self.processes_within(self.cfg.walk_limits())
    }

    /// The process table, within `limits`; the caller holds the lock.
    pub fn processes_within(&mut self, limits: Limits) -> Result<Vec<Process>, GuestError> {
        let r = match (&self.kernel, &self.mem) {
            (Some(k), Some(mem)) if self.locked => {
                k.target.walk_within(mem, limits).map_err(GuestError::from)
            }
            _ => Err(GuestError::NotLocked),
        };
        self.guard(r)
    }

    /// Per-user fork rates (forks in the current or previous 1 s window) from the kernel's own
    /// counters, on a patched guest; `None` on a stock kernel, which has no such counters.
    pub fn fork_rates(&mut self, sb: &SensorBox) -> Result<Option<Vec<(u32, u64)>>, GuestError> {
        let (Some(k), Some(mem), Some(st)) = (&self.kernel, &self.mem, &sb.state) else {
            return Ok(None);
        };
        if st.fork_users.is_none() {
            return Ok(None);
        }
        let rates = introspect::forkrate::per_user_fork_rates(
            mem,
            &k.target.loc,
            st,
            sb.header.jiffies,
            sb.header.hz,
        )?;
        Ok(Some(
            rates
                .into_iter()
                .map(|r| (r.uid, u64::from(r.rate)))
                .collect(),
        ))
    }

    /// Kills `victims` through [`repair::kill`], the one kill path (it applies the never-kill
    /// rule, chooses the mailbox or direct writes, re-checks each direct victim and starts
    /// nothing after `until`). The caller holds the lock: healers call
    /// [`crate::hm::Held::kill`], which passes the end of its lease.
    pub fn kill(
        &mut self,
        victims: &Victims,
        table: Option<&[Process]>,
        spared: &Spared,
        sb: Option<&SensorBox>,
        until: Option<Instant>,
    ) -> Result<Killed, GuestError> {
        let r = match (&self.kernel, &self.mem) {
            (Some(k), Some(mem)) if self.locked => {
                let km = KernelMem::new(mem, k.target.loc.clone());
                let site = KillSite {
                    mem,
                    km: &km,
                    sb,
                    direct: &k.direct,
                    until,
                };
                repair::kill(&site, victims, table, spared).map_err(GuestError::from)
            }
            _ => Err(GuestError::NotLocked),
        };
        self.guard(r)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.unlock();
    }
}
