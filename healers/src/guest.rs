//! One attached guest, seen through its bridge: sampling, the lock, the process table and kills.
//!
//! A session that fails is dropped and re-opened at the next call, so a bridge that restarts or a
//! network blip costs one sample, not the monitor. The guest kernel is located once per boot (the
//! Sensor Box's `boot_id` changes when the guest reboots) and reused.

use std::time::{Duration, Instant};

use introspect::consistency;
use introspect::hooks::{KillTarget, Mailbox};
use introspect::kernel::Symbols;
use introspect::repair::{self, DirectLayout};
use introspect::sensorbox::SensorBox;
use introspect::target::{KernelFiles, Target};
use introspect::tasks::{KernelMem, Process};
use introspect::virtual_sensors::VirtualSensors;
use rdma_bridge::client::{Bridge, BridgeMem};
use rdma_bridge::wire::VmStatus;

use crate::config::GuestConfig;

/// How long the lock waits for a moment when no fork or exit holds `tasklist_lock`, before it goes
/// ahead anyway (the paper's forced lock).
pub const QUIESCE: Duration = Duration::from_millis(200);

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

/// What a kill request did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Killed {
    /// Processes targeted.
    pub processes: usize,
    /// Requests written (mailbox slots or direct signal writes).
    pub requests: usize,
    /// How: "mailbox" or "direct".
    pub how: &'static str,
}

/// One guest.
pub struct Guest {
    /// Its config.
    pub cfg: GuestConfig,
    mem: Option<BridgeMem>,
    kernel: Option<Kernel>,
    locked: bool,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
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

    fn session(&mut self) -> Result<&BridgeMem, String> {
        if self.mem.is_none() {
            let b = Bridge::connect(self.cfg.bridge.as_str(), &self.cfg.identity())
                .map_err(|e| format!("bridge {}: {e}", self.cfg.bridge))?;
            self.mem = Some(BridgeMem::new(b));
        }
        self.mem.as_ref().ok_or_else(|| "no session".to_string())
    }

    /// Drops the session (it will be re-opened).
    pub fn disconnect(&mut self) {
        self.mem = None;
        self.locked = false;
    }

    fn guard<T>(&mut self, r: Result<T, String>) -> Result<T, String> {
        if r.is_err() {
            self.disconnect();
        }
        r
    }

    /// A Sensor Box sample: the guest's own (patched), or virtual sensors (stock).
    pub fn sample(&mut self) -> Result<SensorBox, String> {
        let r = if self.stock() {
            self.virtual_sample()
        } else {
            self.session()
                .and_then(|m| m.bridge().sensor_box().map_err(err))
        };
        self.guard(r)
    }

    fn virtual_sample(&mut self) -> Result<SensorBox, String> {
        self.ensure_kernel(None)?;
        let (Some(k), Some(mem)) = (&self.kernel, &self.mem) else {
            return Err("kernel not located".into());
        };
        let virt = k.virt.as_ref().ok_or("no virtual sensors")?;
        virt.sample(&KernelMem::new(mem, k.target.loc.clone()))
            .map_err(err)
    }

    /// Restarts the guest through the bridge (bdvmm reboots it in place).
    pub fn restart(&mut self) -> Result<(), String> {
        let r = self
            .session()
            .and_then(|m| m.bridge().restart().map_err(err));
        self.kernel = None;
        self.guard(r)
    }

    /// bdvmm's view of the vCPUs.
    pub fn status(&mut self) -> Result<VmStatus, String> {
        let r = self
            .session()
            .and_then(|m| m.bridge().status().map_err(err));
        self.guard(r)
    }

    /// Locates the kernel if not yet done for this boot.
    fn ensure_kernel(&mut self, sb: Option<&SensorBox>) -> Result<(), String> {
        let boot_id = sb.map(|s| s.header.boot_id);
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
        let direct = DirectLayout::from_btf(&target.btf).map_err(err)?;
        let virt = match &map {
            Some(m) => {
                let syms = Symbols::from_file(m).map_err(err)?;
                Some(VirtualSensors::new(&syms, &target.btf, &target.loc).map_err(err)?)
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
    /// the guest running 2 ms in between), or after [`QUIESCE`] anyway.
    pub fn lock(&mut self, sb: Option<&SensorBox>) -> Result<LockInfo, String> {
        let r = self.lock_inner(sb);
        self.guard(r)
    }

    fn lock_inner(&mut self, sb: Option<&SensorBox>) -> Result<LockInfo, String> {
        self.ensure_kernel(sb)?;
        let lease = Duration::from_millis(self.cfg.lease_ms);
        let (Some(k), Some(mem)) = (&self.kernel, &self.mem) else {
            return Err("kernel not located".into());
        };
        let mut pauser = mem.pauser(lease);
        let l = consistency::pause_quiescent(&mut pauser, QUIESCE, || k.target.tasklist_busy(mem))?;
        let info = LockInfo {
            lock_ns: pauser.last_lock().as_nanos() as u64,
            attempts: l.attempts,
            forced: l.forced,
            at: Some(Instant::now()),
        };
        self.locked = true;
        Ok(info)
    }

    /// Releases the lock.
    pub fn unlock(&mut self) -> Result<(), String> {
        if !self.locked {
            return Ok(());
        }
        self.locked = false;
        let r = self.session().and_then(|m| m.unlock().map_err(err));
        self.guard(r)
    }

    /// The process table; the caller holds the lock.
    pub fn processes(&mut self) -> Result<Vec<Process>, String> {
        let r = match (&self.kernel, &self.mem) {
            (Some(k), Some(mem)) => k.target.walk(mem),
            _ => Err("lock the guest first".into()),
        };
        self.guard(r)
    }

    /// Per-user fork rates (forks in the current or previous 1 s window) from the kernel's own
    /// counters, on a patched guest; `None` on a stock kernel, which has no such counters.
    pub fn fork_rates(&mut self, sb: &SensorBox) -> Result<Option<Vec<(u32, u64)>>, String> {
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
        )
        .map_err(err)?;
        Ok(Some(
            rates
                .into_iter()
                .map(|r| (r.uid, u64::from(r.rate)))
                .collect(),
        ))
    }

    /// Kills every process of `uid` (never 0): one KILL_UID mailbox request on a patched guest
    /// (the kernel skips init and kernel threads), a SIGKILL written into each process on a stock
    /// one, which needs the process `table`. The caller holds the lock.
    pub fn kill_uid(
        &mut self,
        uid: u32,
        table: Option<&[Process]>,
        spared: &[u32],
        sb: Option<&SensorBox>,
    ) -> Result<Killed, String> {
        if uid == 0 || spared.contains(&uid) {
            return Err(format!("refusing to kill uid {uid}"));
        }
        let victims: Vec<&Process> = table
            .unwrap_or_default()
            .iter()
            .filter(|p| p.task.uid == uid && crate::policy::killable(p, spared))
            .collect();
        if table.is_none() && (self.stock() || sb.is_none()) {
            return Err("killing a user without the mailbox needs the process table".into());
        }
        let r = match (sb.filter(|_| !self.stock()), &self.mem) {
            (Some(sb), Some(mem)) => Mailbox::open(mem, sb)
                .and_then(|mb| mb.post(mem, KillTarget::Uid(uid), u64::from(uid)))
                .map(|_| Killed {
                    processes: victims.len(),
                    requests: 1,
                    how: "mailbox",
                })
                .map_err(err),
            _ => self.kill_direct(&victims),
        };
        self.guard(r)
    }

    /// Kills these processes (the caller holds the lock): KILL_PID requests with the start-time
    /// guard on a patched guest, direct SIGKILL writes on a stock one.
    pub fn kill_pids(
        &mut self,
        pids: &[u32],
        table: &[Process],
        spared: &[u32],
        sb: Option<&SensorBox>,
    ) -> Result<Killed, String> {
        let victims: Vec<&Process> = table
            .iter()
            .filter(|p| pids.contains(&p.task.pid) && crate::policy::killable(p, spared))
            .collect();
        let r = match (sb.filter(|_| !self.stock()), &self.mem) {
            (Some(sb), Some(mem)) => {
                let mb = Mailbox::open(mem, sb).map_err(err)?;
                let mut n = 0;
                for p in &victims {
                    mb.post(
                        mem,
                        KillTarget::Pid {
                            pid: p.task.pid,
                            start_time: p.task.start_time,
                        },
                        u64::from(p.task.pid),
                    )
                    .map_err(err)?;
                    n += 1;
                }
                Ok(Killed {
                    processes: victims.len(),
                    requests: n,
                    how: "mailbox",
                })
            }
            _ => self.kill_direct(&victims),
        };
        self.guard(r)
    }

    fn kill_direct(&self, victims: &[&Process]) -> Result<Killed, String> {
        let (Some(k), Some(mem)) = (&self.kernel, &self.mem) else {
            return Err("lock the guest first".into());
        };
        let km = KernelMem::new(mem, k.target.loc.clone());
        let mut n = 0;
        for p in victims {
            repair::post_sigkill(mem, &km, None, &k.direct, p).map_err(err)?;
            n += 1;
        }
        Ok(Killed {
            processes: victims.len(),
            requests: n,
            how: "direct",
        })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.unlock();
    }
}
