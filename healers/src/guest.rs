//! One attached guest, seen through its bridge: sampling, the lock, the process table and kills.
//!
//! A session that fails is dropped and re-opened at the next call (the dispatcher backs off while
//! it keeps failing), so a bridge that restarts or a network blip costs one sample, not the
//! monitor. The guest kernel is located once per boot (the Sensor Box's `boot_id` changes when the
//! guest reboots) and reused.
//!
//! First, do no harm: a stock kernel's `system_map` and `vmlinux` are read and parsed with the
//! guest running, once, and kept for as long as neither file changes (path, size and mtime); the
//! pause of a locate covers its memory reads only. Every pause is taken through the guest's
//! [`PauseBudget`] (see [`crate::budget`]): a lock outside a repair that would break it is not
//! taken ([`GuestError::Budget`]), and the time a lock holds the guest is charged to it unless a
//! kill was posted under it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bridge_client::client::{Bridge, BridgeMem, ClientError, InspectError};
use bridge_client::wire::{self, VmStatus};
use introspect::consistency::{self, Pausable};
use introspect::cpus::{Cpu, CpusError};
use introspect::forkrate::ForkRateError;
use introspect::kernel::KernelError;
use introspect::layout::Unresolved;
use introspect::repair::{
    self, DirectLayout, KillSite, Killed, Order, RepairError, Spared, Victims,
};
use introspect::sensorbox::SensorBox;
use introspect::target::{KernelFiles, StockKernel, Target, TargetError};
use introspect::tasks::{KernelMem, Limits, Process, TaskError};
use introspect::virtual_sensors::{VirtualError, VirtualSensors};

use crate::budget::{PauseBudget, MIN_PAUSE};
use crate::config::GuestConfig;

/// How long the lock waits for a moment when no fork or exit holds `tasklist_lock`, before it goes
/// ahead anyway (the paper's forced lock).
pub const QUIESCE: Duration = Duration::from_millis(200);

/// Longest lease of a locate's pause (less when less of the pause budget is left).
pub const LOCATE_LEASE: Duration = Duration::from_secs(10);

/// What a budget-capped lease leaves for the vCPUs to stop, which bdvmm does not count in the
/// lease (half of [`MIN_PAUSE`], so such a lease is at least 5 ms).
const STOP_MARGIN: Duration = Duration::from_millis(5);

/// "bridge A: why", saying the address once (the client's own errors may name it already).
fn connect_message(bridge: &str, source: &ClientError) -> String {
    let why = source.to_string();
    let named = format!("bridge {bridge}: ");
    match why.strip_prefix(&named) {
        Some(rest) => format!("{named}{rest}"),
        None => format!("{named}{why}"),
    }
}

/// Why a call on the guest failed: the session to its bridge (dropped, re-opened at the next call)
/// or what its memory holds.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The bridge cannot be reached.
    #[error("{}", connect_message(bridge, source))]
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
    /// A stock kernel's `system_map` or `vmlinux` cannot be read or does not parse; no lock was
    /// taken.
    #[error(transparent)]
    Files(TargetError),
    /// Locating the kernel in guest memory.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// The lock would break the guest's pause budget, so it was not taken.
    #[error(
        "lock not taken: bdmon's pause budget for this guest is spent ({} ms of {} ms in the last {} s)",
        .used.as_millis(), .allowed.as_millis(), .window.as_secs()
    )]
    Budget {
        /// Paused time charged within the window.
        used: Duration,
        /// The budget per window.
        allowed: Duration,
        /// The window.
        window: Duration,
        /// When a lock fits again.
        retry_at: Instant,
    },
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
    /// A fleet guest, and this monitor cannot prove it still owns it (its etcd lease is not
    /// confirmed): it takes no lock and writes nothing until it can.
    #[error("fenced: this monitor's fleet membership is not confirmed by etcd, so it does not act on the guest")]
    Fenced,
    /// The CPUs' runqueues cannot be read.
    #[error("the guest's runqueues: {0}")]
    Cpus(Box<CpusError>),
    /// Read without the lock, the State Boxes kept changing: the guest still runs.
    #[error(
        "the State Boxes changed between {0} reads without the lock: the guest still runs (take \
         the lock, or freeze it first)"
    )]
    StateBoxesMoving(u32),
}

/// State Box regions read from a guest ([`Guest::state_boxes`]).
#[derive(Debug)]
pub struct StateBoxes {
    /// Every region found.
    pub regions: Vec<introspect::statebox::Region>,
    /// Processes whose region was refused, with why.
    pub refused: Vec<introspect::statebox::StateBoxError>,
    /// Processes looked at.
    pub looked_at: usize,
}

/// Reads without the lock that must agree before [`Guest::state_boxes`] trusts them.
pub const UNLOCKED_READS: u32 = 4;

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

    /// For a lock the budget refused, when one fits again.
    pub fn retry_at(&self) -> Option<Instant> {
        match self {
            GuestError::Budget { retry_at, .. } => Some(*retry_at),
            _ => None,
        }
    }

    /// What the user should fix, naming the setting of `[[guest]] name` at fault, when the error
    /// says.
    pub fn fix(&self, name: &str) -> Option<String> {
        let g = format!("[[guest]] {name}");
        let target = |e: &TargetError| -> Option<String> {
            Some(match e {
                TargetError::Vmlinux { .. } => format!("fix `vmlinux` in {g}"),
                TargetError::VmlinuxBtf { .. } => format!(
                    "fix `vmlinux` in {g}: it must be the guest kernel's uncompressed vmlinux, \
                     built with CONFIG_DEBUG_INFO_BTF"
                ),
                TargetError::Kernel(KernelError::SystemMap(..)) => {
                    format!("fix `system_map` in {g}")
                }
                TargetError::NoSymbol(_)
                | TargetError::Kernel(_)
                | TargetError::Task(_)
                | TargetError::Btf(_) => format!(
                    "check that `system_map` and `vmlinux` in {g} belong to the kernel the guest \
                     runs (or leave both out for a patched guest)"
                ),
                _ => return None,
            })
        };
        match self {
            GuestError::Connect { .. } => Some(format!(
                "check `bridge`, `pki` and `monitor` in {g}, and that the bridge runs"
            )),
            GuestError::Files(e) | GuestError::Target(e) => target(e),
            GuestError::Inspect(InspectError::Target(e)) => target(e),
            GuestError::Kernel(KernelError::SystemMap(..)) => {
                Some(format!("fix `system_map` in {g}"))
            }
            GuestError::Session(c) if c.code() == Some(wire::code::DENIED) => Some(format!(
                "the bridge refused monitor `monitor` of {g}: check its grants in the bridge's config"
            )),
            GuestError::Budget { .. } => Some(format!(
                "bdmon holds itself to `pause_budget_percent` for {g}; see the events before this \
                 for what kept locking"
            )),
            _ => None,
        }
    }

    /// True if no lock can be held after this error, so the session need not be dropped.
    fn lock_free(&self) -> bool {
        matches!(
            self,
            GuestError::Files(_)
                | GuestError::Budget { .. }
                | GuestError::Cpus(_)
                | GuestError::Fenced
        )
    }
}

/// A located kernel.
struct Kernel {
    boot_id: Option<u64>,
    target: Target,
    direct: DirectLayout,
    virt: Option<VirtualSensors>,
    /// Its release (`uname -r`), or "unknown release".
    release: String,
    /// Its [`Guest::take_layout_notes`] were taken.
    noted: bool,
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

/// A file as it was when read: a change of any of these means read it again.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileKey {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileKey {
    fn of(path: &Path) -> Option<FileKey> {
        let m = std::fs::metadata(path).ok()?;
        Some(FileKey {
            path: path.to_owned(),
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

/// A stock kernel's files, parsed, and the files as they were (`None`: could not be told, so
/// read again next time).
struct LoadedFiles {
    keys: [Option<FileKey>; 2],
    kernel: StockKernel,
}

/// The lock, held.
#[derive(Clone, Copy, Debug)]
struct HeldLock {
    /// When the guest was paused.
    since: Instant,
    /// A kill was posted under it: it is a repair, outside the budget.
    repair: bool,
}

/// How often a guest found stock (no configured files, no Sensor Box) is looked at again for a
/// Sensor Box: one small read of its backdoor range.
pub const STOCK_RECHECK: Duration = Duration::from_secs(1);

/// One guest.
pub struct Guest {
    /// Its config.
    pub cfg: GuestConfig,
    mem: Option<BridgeMem>,
    kernel: Option<Kernel>,
    files: Option<LoadedFiles>,
    /// A stock kernel found in the guest's memory (no files configured), kept for this boot.
    found: Option<StockKernel>,
    /// Whether the guest runs a stock kernel, found out at the first sample when no files say
    /// so: a guest whose backdoor range holds no Sensor Box is stock.
    detected_stock: Option<bool>,
    /// When a guest found stock was last looked at again for a Sensor Box: a patched kernel
    /// that was still booting when bdmon attached publishes one a moment later.
    stock_rechecked: Option<Instant>,
    /// A Sensor Box appeared in a guest first found stock (not yet reported).
    sensor_box_appeared: bool,
    budget: PauseBudget,
    locked: Option<HeldLock>,
}

/// The bridge's lock, taken within the guest's pause budget: refused when less than
/// [`MIN_PAUSE`] is left; outside a repair, with the budget left as its lease (bdvmm ends the pause
/// there whatever bdmon does); every pause it ends is charged.
struct Budgeted<'a> {
    mem: &'a BridgeMem,
    budget: &'a mut PauseBudget,
    lease: Duration,
    /// May become a repair: the lease is `lease` in full, charged only if no kill follows.
    repair: bool,
    since: Option<Instant>,
    last_lock: Duration,
}

impl Pausable for Budgeted<'_> {
    type Error = GuestError;

    fn pause(&mut self) -> Result<(), GuestError> {
        let now = Instant::now();
        let left = self.budget.remaining(now);
        if left < MIN_PAUSE {
            return Err(GuestError::Budget {
                used: self.budget.used(now),
                allowed: self.budget.allowed(),
                window: self.budget.window(),
                retry_at: self
                    .budget
                    .fits_at(MIN_PAUSE, now)
                    .unwrap_or(now + self.budget.window()),
            });
        }
        // Outside a repair the lease is the budget left, less the time the vCPUs may take to
        // stop (bdvmm starts the lease once they have): bdvmm ends the pause within the budget.
        let lease = if self.repair {
            self.lease
        } else {
            self.lease.min(left.saturating_sub(STOP_MARGIN))
        };
        // Charged from before the request: the guest may stop before the reply comes back.
        let at = Instant::now();
        match self.mem.lock(lease) {
            Ok(took) => {
                self.last_lock = took;
                self.since = Some(at);
                Ok(())
            }
            Err(e) => {
                self.budget.charge(at, Instant::now());
                Err(e.into())
            }
        }
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        let r = self.mem.unlock();
        if let Some(t) = self.since.take() {
            self.budget.charge(t, Instant::now());
        }
        Ok(r?)
    }
}

impl Guest {
    /// A guest not yet connected.
    pub fn new(cfg: GuestConfig) -> Guest {
        Guest {
            budget: cfg.pause_budget(),
            cfg,
            mem: None,
            kernel: None,
            files: None,
            found: None,
            detected_stock: None,
            stock_rechecked: None,
            sensor_box_appeared: false,
            locked: None,
        }
    }

    /// The guest's pause budget: what bdmon has charged to it.
    pub fn budget(&mut self) -> &mut PauseBudget {
        &mut self.budget
    }

    /// True for a stock kernel (virtual sensors): files configured, or no Sensor Box found in the
    /// guest's backdoor range at the first sample.
    pub fn stock(&self) -> bool {
        self.cfg.system_map.is_some() || self.detected_stock == Some(true)
    }

    /// Finds out whether a guest without configured files is stock: its backdoor range holds no
    /// Sensor Box (read with the guest running). Found once per boot — except that a guest found
    /// stock is looked at again every [`STOCK_RECHECK`]: a patched kernel still booting when
    /// bdmon attached has published no Sensor Box yet, and it must not be watched (and repaired)
    /// as a stock kernel for the rest of its boot.
    fn detect(&mut self) -> Result<(), GuestError> {
        if self.cfg.system_map.is_some() {
            return Ok(());
        }
        match (self.detected_stock, self.stock_rechecked) {
            (Some(false), _) => return Ok(()),
            (Some(true), Some(t)) if t.elapsed() < STOCK_RECHECK => return Ok(()),
            _ => {}
        }
        let mem = self.session()?;
        let (gpa, size) = mem.bridge().backdoor();
        let stock = matches!(
            (KernelFiles::Auto { gpa, size }).resolve(mem),
            KernelFiles::Memory
        );
        if self.detected_stock == Some(true) && !stock {
            // What was found in its memory belongs to the stock view: start over.
            self.kernel = None;
            self.found = None;
            self.sensor_box_appeared = true;
        }
        self.detected_stock = Some(stock);
        self.stock_rechecked = Some(Instant::now());
        Ok(())
    }

    /// True once after a guest first found stock turned out to have a Sensor Box (a patched
    /// kernel that was still booting): bdmon says so and samples the Sensor Box from then on.
    pub fn take_sensor_box_appeared(&mut self) -> bool {
        std::mem::take(&mut self.sensor_box_appeared)
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

    /// True for a guest known to run a patched kernel (its own Sensor Box): it can be sampled
    /// without this session, by the sampler.
    pub fn patched(&self) -> bool {
        self.cfg.system_map.is_none() && self.detected_stock == Some(false)
    }

    /// True while this session holds the guest's pause lock.
    pub fn holds_lock(&self) -> bool {
        self.locked.is_some()
    }

    /// Drops the session (it will be re-opened; the bridge ends any lock it held).
    pub fn disconnect(&mut self) {
        self.mem = None;
        self.settle_lock();
    }

    /// Forgets the held lock, charging it to the budget unless it was a repair.
    fn settle_lock(&mut self) {
        if let Some(l) = self.locked.take() {
            if !l.repair {
                self.budget.charge(l.since, Instant::now());
            }
        }
    }

    fn guard<T>(&mut self, r: Result<T, GuestError>) -> Result<T, GuestError> {
        if let Err(e) = &r {
            if !e.lock_free() {
                self.disconnect();
            }
        }
        r
    }

    /// A Sensor Box sample: the guest's own (patched), or virtual sensors (stock).
    pub fn sample(&mut self) -> Result<SensorBox, GuestError> {
        let r = self.detect();
        let r = if let Err(e) = r {
            Err(e)
        } else if self.stock() {
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
        self.found = None;
        self.detected_stock = None;
        self.stock_rechecked = None;
        self.guard(r)
    }

    /// bdvmm's view of the vCPUs.
    pub fn status(&mut self) -> Result<VmStatus, GuestError> {
        let r = self.session().and_then(|m| Ok(m.bridge().status()?));
        self.guard(r)
    }

    /// The stock kernel's files, parsed: loaded once, again only when either file changes. No
    /// lock is held here.
    fn stock_kernel(&mut self) -> Result<Option<&StockKernel>, GuestError> {
        let (Some(map), Some(vmlinux)) = (&self.cfg.system_map, &self.cfg.vmlinux) else {
            return Ok(None);
        };
        let keys = [FileKey::of(map), FileKey::of(vmlinux)];
        let fresh = self
            .files
            .as_ref()
            .is_some_and(|f| keys.iter().all(Option::is_some) && f.keys == keys);
        if !fresh {
            self.files = None;
            let kernel = StockKernel::load(map, vmlinux).map_err(GuestError::Files)?;
            self.files = Some(LoadedFiles { keys, kernel });
        }
        Ok(self.files.as_ref().map(|f| &f.kernel))
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
        // Files first, with the guest running.
        self.stock_kernel()?;
        self.session()?;
        let (Some(mem), budget) = (&self.mem, &mut self.budget) else {
            return Err(GuestError::NotLocked);
        };
        let mut pauser = Budgeted {
            mem,
            budget,
            lease: LOCATE_LEASE,
            repair: false,
            since: None,
            last_lock: Duration::ZERO,
        };
        let regs = |p: &mut Budgeted| {
            let r = p.mem.bridge().regs(0)?;
            Ok::<_, GuestError>((r.cr3, r.cr4))
        };
        // A stock guest without files: its kernel is found in its memory, paused only to read
        // CR3 (kept for this boot; found again after a restart).
        let memory_stock = self.files.is_none() && self.detected_stock == Some(true);
        let fresh = if memory_stock && self.found.is_none() {
            let (k, loc) = StockKernel::discover_paused(mem, &mut pauser, regs)?;
            Some((k, loc))
        } else {
            None
        };
        let (target, found) = match fresh {
            Some((k, loc)) => (Target::with_stock(mem, &k, loc)?, Some(k)),
            None => {
                let stock = self
                    .files
                    .as_ref()
                    .map(|f| &f.kernel)
                    .or(self.found.as_ref());
                let (gpa, size) = mem.bridge().backdoor();
                let files = match stock {
                    Some(k) => KernelFiles::Stock(k),
                    None => KernelFiles::SensorBox { gpa, size },
                };
                match Target::locate_paused(mem, &mut pauser, regs, files) {
                    Ok(t) => (t, None),
                    Err(e) => {
                        // The guest may have rebooted into another kernel: the next attempt
                        // finds it in memory again rather than failing on the old one forever.
                        if self.files.is_none() {
                            self.found = None;
                            self.detected_stock = None;
                        }
                        return Err(e);
                    }
                }
            }
        };
        if found.is_some() {
            self.found = found;
        }
        let stock = self
            .files
            .as_ref()
            .map(|f| &f.kernel)
            .or(self.found.as_ref());
        let direct = DirectLayout::from_btf(&target.btf)?;
        // The banner is read-only data: read with the guest running, for messages only.
        let banner = match stock {
            Some(k) => k
                .symbols()
                .get("linux_banner")
                .map(|a| a.wrapping_add(target.loc.slide)),
            None => sb.and_then(|s| s.state.as_ref()).map(|st| st.linux_banner),
        };
        let release = banner
            .and_then(|va| {
                introspect::banner::release(&KernelMem::new(mem, target.loc.clone()), va)
            })
            .unwrap_or_else(|| introspect::layout::UNKNOWN_RELEASE.to_owned());
        let virt = match stock {
            Some(k) => Some(VirtualSensors::new_for(
                k.symbols(),
                &target.btf,
                &target.loc,
                &release,
            )?),
            None => None,
        };
        self.kernel = Some(Kernel {
            boot_id,
            target,
            direct,
            virt,
            release,
            noted: false,
        });
        Ok(())
    }

    /// What this guest's kernel lacks and what is off because of it (task layout fields,
    /// virtual sensors), once per located kernel: the caller reports each once. Empty before
    /// the kernel is located, and after.
    pub fn take_layout_notes(&mut self) -> Vec<Unresolved> {
        let Some(k) = self.kernel.as_mut().filter(|k| !k.noted) else {
            return Vec::new();
        };
        k.noted = true;
        let virt = k.virt.as_ref().map(VirtualSensors::unresolved);
        k.target
            .layout
            .unresolved()
            .iter()
            .chain(virt.unwrap_or_default())
            .map(|u| u.for_release(&k.release))
            .collect()
    }

    /// Why the memory policies cannot run on this guest: its kernel's resident set sizes cannot
    /// be read (`None` while the kernel is not located yet, or when they can).
    pub fn rss_unresolved(&self) -> Option<Unresolved> {
        let k = self.kernel.as_ref()?;
        let l = &k.target.layout;
        if l.has_rss() {
            return None;
        }
        l.unresolved()
            .iter()
            .find(|u| u.field == introspect::layout::RSS_FIELD)
            .map(|u| u.for_release(&k.release))
    }

    /// Takes the pause lock at a moment when no fork or exit holds `tasklist_lock` (retrying with
    /// the guest running 2 ms in between), or after [`QUIESCE`] anyway. Healers take it through
    /// [`crate::hm::HealContext::lock`], whose guard releases it.
    pub(crate) fn lock(&mut self, sb: Option<&SensorBox>) -> Result<LockInfo, GuestError> {
        let r = self.lock_inner(sb);
        self.guard(r)
    }

    fn lock_inner(&mut self, sb: Option<&SensorBox>) -> Result<LockInfo, GuestError> {
        if self.cfg.fence.as_ref().is_some_and(|f| f.fenced()) {
            return Err(GuestError::Fenced);
        }
        self.ensure_kernel(sb)?;
        let lease = Duration::from_millis(self.cfg.lease_ms);
        let (Some(k), Some(mem), budget) = (&self.kernel, &self.mem, &mut self.budget) else {
            return Err(GuestError::NotLocked);
        };
        // A healer's lock may become a repair, which the lease alone bounds; if it does not (no
        // culprit, a failure), its time is charged when it ends.
        let mut pauser = Budgeted {
            mem,
            budget,
            lease,
            repair: true,
            since: None,
            last_lock: Duration::ZERO,
        };
        let l = consistency::pause_quiescent(&mut pauser, QUIESCE, || {
            Ok::<_, GuestError>(k.target.tasklist_busy(mem)?)
        })?;
        let since = pauser.since.unwrap_or_else(Instant::now);
        let info = LockInfo {
            lock_ns: crate::events::nanos(pauser.last_lock),
            attempts: l.attempts,
            forced: l.forced,
            at: Some(Instant::now()),
        };
        self.locked = Some(HeldLock {
            since,
            repair: false,
        });
        Ok(info)
    }

    /// Releases the lock.
    pub(crate) fn unlock(&mut self) -> Result<(), GuestError> {
        if self.locked.is_none() {
            return Ok(());
        }
        let r = self.session().and_then(|m| Ok(m.unlock()?));
        self.settle_lock();
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
            (Some(k), Some(mem)) if self.locked.is_some() => {
                k.target.walk_within(mem, limits).map_err(GuestError::from)
            }
            _ => Err(GuestError::NotLocked),
        };
        self.guard(r)
    }

    /// Locates the guest's kernel now (pausing it briefly once per boot, see [`Guest::lock`])
    /// unless it is located for this boot already: a guest whose sessions may have to be moved
    /// is located while it is healthy, since a guest whose vCPUs no longer answer cannot be
    /// paused to read its CPU registers.
    pub fn locate(&mut self, sb: &SensorBox) -> Result<(), GuestError> {
        let r = self.ensure_kernel(Some(sb));
        self.guard(r)
    }

    /// True once the kernel is located for the current boot.
    pub fn located(&self) -> bool {
        self.kernel.is_some()
    }

    /// The State Box regions of the processes `select` picks ([`introspect::statebox`]). With
    /// the lock held, one read; without it (a guest that cannot be paused: frozen, or its
    /// bdvmm not answering) the process table and the regions are read until two reads in a row
    /// agree, at most [`UNLOCKED_READS`] times: a guest that still runs is refused.
    pub fn state_boxes(
        &mut self,
        select: &dyn Fn(&Process) -> bool,
    ) -> Result<StateBoxes, GuestError> {
        let r = self.state_boxes_inner(select);
        self.guard(r)
    }

    fn state_boxes_inner(
        &mut self,
        select: &dyn Fn(&Process) -> bool,
    ) -> Result<StateBoxes, GuestError> {
        self.session()?;
        self.ensure_kernel(None)?;
        let limits = self.cfg.walk_limits();
        let locked = self.locked.is_some();
        let (Some(k), Some(mem)) = (&self.kernel, &self.mem) else {
            return Err(GuestError::NotLocked);
        };
        let read = || -> Result<StateBoxes, GuestError> {
            let table = k.target.walk_within(mem, limits)?;
            let (regions, refused) = introspect::statebox::read_all(&k.target, mem, &table, select);
            Ok(StateBoxes {
                regions,
                refused,
                looked_at: table.iter().filter(|p| select(p)).count(),
            })
        };
        if locked {
            return read();
        }
        let key = |s: &StateBoxes| -> Vec<(u32, u32, u64, u64, u64)> {
            s.regions
                .iter()
                .flat_map(|r| {
                    r.boxes
                        .iter()
                        .map(move |b| (r.pid, b.slot, b.id, b.generation, b.seq))
                })
                .collect()
        };
        let mut last = read()?;
        for _ in 1..UNLOCKED_READS {
            let now = read()?;
            if key(&now) == key(&last) {
                return Ok(now);
            }
            last = now;
        }
        Err(GuestError::StateBoxesMoving(UNLOCKED_READS))
    }

    /// SIGCONT to every process of `uid` (`CONT_UID`, patched guests): what undoes a stop of
    /// CPU_Share_Healer. Samples, locks, posts, unlocks (on every path).
    pub fn resume_user(&mut self, uid: u32, spared: &Spared) -> Result<Killed, GuestError> {
        let sb = self.sample()?;
        self.lock(Some(&sb))?;
        let r = self.apply(
            Order::Cont,
            &Victims::Uid(uid),
            None,
            spared,
            Some(&sb),
            None,
        );
        let u = self.unlock();
        let done = r?;
        u?;
        Ok(done)
    }

    /// Every CPU's runqueue: its current task, runnable tasks and how long the task has held it.
    /// Single-word reads; the caller holds the lock when it acts on them.
    pub fn cpus(&mut self) -> Result<Vec<Cpu>, GuestError> {
        let r = match (&self.kernel, &self.mem) {
            (Some(k), Some(mem)) => match &k.target.cpus {
                Ok(rq) => rq
                    .read(&KernelMem::new(mem, k.target.loc.clone()))
                    .map_err(|e| GuestError::Cpus(Box::new(e))),
                Err(why) => Err(GuestError::Cpus(Box::new(why.clone().into()))),
            },
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
        self.apply(Order::Kill, victims, table, spared, sb, until)
    }

    /// [`Guest::kill`] for any [`Order`] ([`repair::apply`]): stop, continue and renice go
    /// through the mailbox of a patched guest only. The caller holds the lock.
    pub fn apply(
        &mut self,
        order: Order,
        victims: &Victims,
        table: Option<&[Process]>,
        spared: &Spared,
        sb: Option<&SensorBox>,
        until: Option<Instant>,
    ) -> Result<Killed, GuestError> {
        let r = match (&self.kernel, &self.mem, &mut self.locked) {
            (Some(k), Some(mem), Some(held)) => {
                // A diagnosed culprit: this lock is a repair, outside the pause budget.
                held.repair = true;
                let km = KernelMem::new(mem, k.target.loc.clone());
                let site = KillSite {
                    mem,
                    km: &km,
                    sb,
                    direct: &k.direct,
                    until,
                };
                repair::apply(&site, order, victims, table, spared).map_err(GuestError::from)
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
