//! Virtual sensors for unpatched guests: a Sensor-Box-shaped view computed from the kernel's own
//! counters, so healers work the same way on a stock kernel.
//!
//! | sensor | computed from |
//! |---|---|
//! | `TIMER_TICKS` | `jiffies_64` |
//! | `CONTEXT_SWITCHES` | Σ per-CPU `runqueues.nr_switches` |
//! | `NPROCS` | `nr_threads` |
//! | `FREE_PAGES` | `vm_zone_stat[NR_FREE_PAGES]` |
//! | `OOM_KILLS` | Σ per-CPU `vm_event_states.event[OOM_KILL]` |
//! | `NR_RUNNING` | Σ per-CPU `runqueues.nr_running` |
//! | `CPU_PROGRESS` | per-CPU `runqueues` and the current task's `sched_info.last_arrival` ([`crate::cpus::progress_ms`]) |
//! | `TOTAL_FORKS` (virtual only, id 100) | `total_forks`; a monitor derives the fork rate from two samples |
//!
//! Each sensor needs its own symbols and fields: one the kernel lacks is left out of the view and
//! listed in [`VirtualSensors::unresolved`]; only `TIMER_TICKS` is required.
//!
//! What a stock kernel cannot say: the per-user fork rate, failed forks, entries to the OOM
//! handler, a full file table. Those sensors are absent from the view, not zero.

use crate::btf::Btf;
use crate::cpus::{CpuCount, RqLayout, Runqueues};
use crate::kernel::{KernelLocation, Symbols};
use crate::layout::{FieldError, Unresolved, UNKNOWN_RELEASE};
use crate::sensorbox::{ids, Header, Sensor, SensorBox, SensorClass, FLAG_LOWER_BOUND, FLAG_VALID};
use crate::tasks::{KernelMem, TaskError};

/// Id of the virtual `TOTAL_FORKS` sensor (outside the Sensor Box's numbering).
pub const TOTAL_FORKS: u32 = 100;
/// `NR_RUNNING`'s default threshold per CPU, as the patched kernel sets it.
pub const NR_RUNNING_PER_CPU: u64 = 4;
/// Most CPUs we sum over.
const MAX_CPUS: u32 = 8192;

/// Why the view could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum VirtualError {
    /// A symbol the view cannot do without is missing.
    #[error("symbol {0} not found in System.map")]
    NoSymbol(&'static str),
    /// Layouts.
    #[error(transparent)]
    Btf(#[from] crate::btf::BtfError),
    /// Reading memory.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// Implausible values.
    #[error("implausible {0}")]
    Implausible(String),
}

/// `nr_cpu_ids` and `__per_cpu_offset` (slid): what a sum over every CPU's copy needs.
#[derive(Clone, Copy, Debug)]
struct PerCpu {
    nr_cpu_ids: u64,
    offsets: u64,
}

/// Addresses and offsets, resolved once. Each sensor needs its own symbols and fields; one that
/// cannot be resolved is left out of the view ([`VirtualSensors::unresolved`] says why), only
/// `TIMER_TICKS` is required.
#[derive(Clone, Debug)]
pub struct VirtualSensors {
    jiffies_64: u64,
    per_cpu: Option<PerCpu>,
    nr_threads: Option<u64>,
    total_forks: Option<u64>,
    /// Per-CPU offset of `runqueues.nr_switches`.
    nr_switches: Option<u64>,
    vm_zone_stat_free: Option<u64>,
    /// Per-CPU offset of `vm_event_states.event[OOM_KILL]`.
    vm_event_oom_kill: Option<u64>,
    /// The runqueues (`NR_RUNNING`, and `CPU_PROGRESS` when hold times can be told).
    runqueues: Option<Runqueues>,
    unresolved: Vec<Unresolved>,
}

/// What one resolution step says when it fails.
type Found<T> = Result<T, FieldError>;

impl VirtualSensors {
    /// Resolves addresses (slid by `loc`) and offsets (from BTF); messages say "unknown release"
    /// ([`VirtualSensors::new_for`] names it).
    pub fn new(syms: &Symbols, btf: &Btf, loc: &KernelLocation) -> Result<Self, VirtualError> {
        Self::new_for(syms, btf, loc, UNKNOWN_RELEASE)
    }

    /// Resolves addresses and offsets of kernel `release`. Fails only without `jiffies_64`
    /// (`TIMER_TICKS`, which every check of a guest's progress needs); any other sensor that
    /// cannot be resolved is left out and listed in [`VirtualSensors::unresolved`].
    pub fn new_for(
        syms: &Symbols,
        btf: &Btf,
        loc: &KernelLocation,
        release: &str,
    ) -> Result<Self, VirtualError> {
        let sym = |n: &str| -> Found<u64> {
            syms.get(n)
                .ok_or_else(|| FieldError::NoSymbol(n.to_owned()))
        };
        let slid = |n: &str| sym(n).map(|a| a.wrapping_add(loc.slide));
        let constant = |n: &str| -> Found<u64> {
            let v = btf.enum_constant(n)?;
            u64::try_from(v)
                .ok()
                .filter(|&i| i < 4096)
                .ok_or_else(|| FieldError::Constant {
                    name: n.to_owned(),
                    value: v,
                })
        };
        let jiffies_64 = slid("jiffies_64").map_err(|_| VirtualError::NoSymbol("jiffies_64"))?;
        let per_cpu = (|| {
            Ok(PerCpu {
                nr_cpu_ids: slid("nr_cpu_ids")?,
                offsets: slid("__per_cpu_offset")?,
            })
        })();
        // Per-CPU symbols are offsets into each CPU's area and are not slid.
        let nr_switches = (|| {
            let rq = btf.struct_layout("rq")?;
            let m = rq.member("nr_switches")?;
            if m.size != 8 {
                return Err(FieldError::Shape {
                    what: "rq.nr_switches".into(),
                    found: format!("{} bytes", m.size),
                    expected: "8".into(),
                });
            }
            let off = rq.offset("nr_switches")?;
            Ok(sym("runqueues")?.wrapping_add(off))
        })();
        let free = (|| Ok(slid("vm_zone_stat")? + constant("NR_FREE_PAGES")? * 8))();
        let oom = (|| {
            let events = btf.struct_layout("vm_event_state")?;
            match events.member("event")?.kind {
                crate::btf::MemberKind::Array { elem_size: 8, .. } => {}
                _ => {
                    return Err(FieldError::NoneOf(
                        "vm_event_state.event is not an array of unsigned long",
                    ))
                }
            }
            let off = events.offset("event")?;
            Ok(sym("vm_event_states")? + off + constant("OOM_KILL")? * 8)
        })();
        let runqueues = (|| {
            Ok(Runqueues {
                runqueues: sym("runqueues")?,
                per_cpu_offset: slid("__per_cpu_offset")?,
                cpus: CpuCount::At(slid("nr_cpu_ids")?),
                layout: RqLayout::from_btf(btf)?,
            })
        })();
        let mut unresolved = Vec::new();
        let mut note = |field, looked_for, disables, reason: FieldError| {
            unresolved.push(Unresolved {
                release: release.to_owned(),
                field,
                looked_for,
                disables,
                reason: reason.to_string(),
            })
        };
        let runqueues = match runqueues {
            Ok(rq) => {
                if !rq.layout.has_hold_time() {
                    note(
                        "task_struct.sched_info.last_arrival",
                        "task_struct.sched_info.last_arrival (CONFIG_SCHED_INFO)",
                        "the CPU_PROGRESS sensor",
                        FieldError::NoneOf("no sched_info.last_arrival"),
                    );
                }
                Some(rq)
            }
            Err(reason) => {
                note(
                    "runqueues",
                    "per-CPU symbol runqueues and struct rq (nr_running, nr_switches, curr, \
                     idle, clock)",
                    "the NR_RUNNING and CPU_PROGRESS sensors",
                    reason,
                );
                None
            }
        };
        let mut keep = |r: Found<u64>, field, looked_for, disables| {
            r.map_err(|reason| {
                unresolved.push(Unresolved {
                    release: release.to_owned(),
                    field,
                    looked_for,
                    disables,
                    reason: reason.to_string(),
                })
            })
            .ok()
        };
        let per_cpu = match per_cpu {
            Ok(pc) => Some(pc),
            Err(reason) => {
                keep(
                    Err(reason),
                    "nr_cpu_ids",
                    "symbols nr_cpu_ids and __per_cpu_offset",
                    "the per-CPU sensors CONTEXT_SWITCHES and OOM_KILLS",
                );
                None
            }
        };
        Ok(Self {
            jiffies_64,
            nr_threads: keep(
                slid("nr_threads"),
                "nr_threads",
                "symbol nr_threads",
                "the NPROCS sensor",
            ),
            total_forks: keep(
                slid("total_forks"),
                "total_forks",
                "symbol total_forks",
                "the TOTAL_FORKS sensor (fork rates)",
            ),
            nr_switches: keep(
                nr_switches,
                "rq.nr_switches",
                "per-CPU symbol runqueues and rq.nr_switches (u64)",
                "the CONTEXT_SWITCHES sensor",
            ),
            vm_zone_stat_free: keep(
                free,
                "vm_zone_stat[NR_FREE_PAGES]",
                "symbol vm_zone_stat and enum constant NR_FREE_PAGES",
                "the FREE_PAGES sensor",
            ),
            vm_event_oom_kill: keep(
                oom,
                "vm_event_states.event[OOM_KILL]",
                "per-CPU symbol vm_event_states, vm_event_state.event and enum constant \
                 OOM_KILL (CONFIG_VM_EVENT_COUNTERS)",
                "the OOM_KILLS sensor",
            ),
            per_cpu,
            runqueues,
            unresolved,
        })
    }

    /// The sensors left out of the view, each with the symbol or field it lacks.
    pub fn unresolved(&self) -> &[Unresolved] {
        &self.unresolved
    }

    fn per_cpu_sum(
        &self,
        km: &KernelMem,
        pc: PerCpu,
        var: u64,
        cpus: u32,
    ) -> Result<u64, VirtualError> {
        let mut sum = 0u64;
        for cpu in 0..u64::from(cpus) {
            let off = km.read_u64(pc.offsets + cpu * 8, "__per_cpu_offset")?;
            sum = sum.wrapping_add(km.read_u64(off.wrapping_add(var), "per-CPU counter")?);
        }
        Ok(sum)
    }

    /// Samples the counters into a Sensor Box view (at `gpa` 0, no externalized state).
    pub fn sample(&self, km: &KernelMem) -> Result<SensorBox, VirtualError> {
        let cpus = match self.per_cpu {
            Some(pc) if self.nr_switches.is_some() || self.vm_event_oom_kill.is_some() => {
                let n = (km.read_u64(pc.nr_cpu_ids, "nr_cpu_ids")? & 0xffff_ffff) as u32;
                if n == 0 || n > MAX_CPUS {
                    return Err(VirtualError::Implausible(format!("nr_cpu_ids {n}")));
                }
                Some((pc, n))
            }
            _ => None,
        };
        let jiffies = km.read_u64(self.jiffies_64, "jiffies_64")?;
        let sensor = |id, class, flags: u16, threshold, value, name: &str| Sensor {
            id,
            class,
            flags: flags | FLAG_VALID,
            threshold,
            value,
            updated: jiffies,
            name: name.to_string(),
        };
        let mut sensors = vec![sensor(
            ids::TIMER_TICKS,
            SensorClass::Progress,
            0,
            1000,
            jiffies,
            "TIMER_TICKS",
        )];
        if let (Some(var), Some((pc, n))) = (self.nr_switches, cpus) {
            sensors.push(sensor(
                ids::CONTEXT_SWITCHES,
                SensorClass::Progress,
                0,
                1000,
                self.per_cpu_sum(km, pc, var, n)?,
                "CONTEXT_SWITCHES",
            ));
        }
        if let Some(at) = self.nr_threads {
            sensors.push(sensor(
                ids::NPROCS,
                SensorClass::Level,
                0,
                4096,
                km.read_u64(at, "nr_threads")? & 0xffff_ffff,
                "NPROCS",
            ));
        }
        if let Some(at) = self.vm_zone_stat_free {
            sensors.push(sensor(
                ids::FREE_PAGES,
                SensorClass::Level,
                FLAG_LOWER_BOUND,
                1024,
                km.read_u64(at, "vm_zone_stat")?,
                "FREE_PAGES",
            ));
        }
        if let Some(at) = self.total_forks {
            sensors.push(sensor(
                TOTAL_FORKS,
                SensorClass::Progress,
                0,
                u64::MAX,
                km.read_u64(at, "total_forks")?,
                "TOTAL_FORKS",
            ));
        }
        if let (Some(var), Some((pc, n))) = (self.vm_event_oom_kill, cpus) {
            sensors.push(sensor(
                ids::OOM_KILLS,
                SensorClass::Pressure,
                0,
                0,
                self.per_cpu_sum(km, pc, var, n)?,
                "OOM_KILLS",
            ));
        }
        if let Some(rq) = &self.runqueues {
            let cpus = rq
                .read(km)
                .map_err(|e| VirtualError::Implausible(format!("runqueues: {e}")))?;
            sensors.push(sensor(
                ids::NR_RUNNING,
                SensorClass::Level,
                0,
                NR_RUNNING_PER_CPU * cpus.len() as u64,
                crate::cpus::nr_running(&cpus),
                "NR_RUNNING",
            ));
            if let Some(ms) = rq
                .layout
                .has_hold_time()
                .then(|| crate::cpus::progress_ms(&cpus))
                .flatten()
            {
                sensors.push(sensor(
                    ids::CPU_PROGRESS,
                    SensorClass::Progress,
                    0,
                    2000,
                    ms,
                    "CPU_PROGRESS",
                ));
            }
        }
        Ok(SensorBox {
            gpa: 0,
            header: Header {
                version: 0,
                region_size: 0,
                hz: 0,
                boot_id: 0,
                seq: 0,
                clock_ns: 0,
                jiffies,
                publishes: 0,
                state: (0, 0),
                hooks: (0, 0),
            },
            sensors,
            state: None,
        })
    }
}

/// A stock guest's virtual Sensor Box with no files: pauses with `pauser` only to read CR3/CR4
/// with `regs`, finds the kernel in its memory with the guest running
/// ([`crate::target::StockKernel::discover`]) and samples its counters.
pub fn sample_discovered<P, E>(
    mem: &dyn crate::mem::PhysMem,
    pauser: &mut P,
    regs: impl FnMut(&mut P) -> Result<(u64, u64), E>,
) -> Result<SensorBox, E>
where
    P: crate::consistency::Pausable,
    E: From<P::Error> + From<crate::target::TargetError> + From<VirtualError>,
{
    let (k, loc) = crate::target::StockKernel::discover_paused(mem, pauser, regs)?;
    let release = k.release().unwrap_or("(unknown release)");
    let v = VirtualSensors::new_for(k.symbols(), k.btf(), &loc, release)?;
    Ok(v.sample(&KernelMem::new(mem, loc))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btf::encoder::B;

    fn btf(with_rq: bool) -> Btf {
        let mut b = B::new();
        let int = b.int("int", 4, true);
        let u64_t = b.int("long long unsigned int", 8, false);
        let events = b.array(u64_t, int, 8);
        b.struct_("vm_event_state", 64, &[("event", events, 0, 0)]);
        if with_rq {
            b.struct_(
                "rq",
                16,
                &[("nr_running", int, 0, 0), ("nr_switches", u64_t, 64, 0)],
            );
        }
        b.enum_("", false, &[("NR_FREE_PAGES", 0)]);
        b.enum_("", false, &[("PGPGIN", 0), ("OOM_KILL", 5)]);
        Btf::parse(&b.build()).unwrap()
    }

    const MAP: &str = "ffffffff82000000 D jiffies_64\nffffffff82000010 D nr_cpu_ids\n\
        ffffffff82000020 D __per_cpu_offset\n0000000000001000 D runqueues\n\
        0000000000002000 D vm_event_states\nffffffff82000100 D vm_zone_stat\n";

    fn loc() -> KernelLocation {
        KernelLocation {
            slide: 0x20_0000,
            phys_base: 0,
            page_offset_base: 0xffff_8880_0000_0000,
            cr3: 0,
            levels: 4,
        }
    }

    #[test]
    fn a_missing_symbol_or_field_drops_only_its_sensor() {
        let v =
            VirtualSensors::new_for(&Symbols::parse(MAP), &btf(false), &loc(), "6.12.9").unwrap();
        let fields: Vec<&str> = v.unresolved().iter().map(|u| u.field).collect();
        assert_eq!(
            fields,
            ["runqueues", "nr_threads", "total_forks", "rq.nr_switches"]
        );
        let line = v.unresolved()[3].to_string();
        assert!(
            line.starts_with("kernel 6.12.9: no rq.nr_switches"),
            "{line}"
        );
        assert!(line.ends_with("the CONTEXT_SWITCHES sensor"), "{line}");
        assert_eq!(v.vm_event_oom_kill, Some(0x2000 + 5 * 8));
        assert_eq!(v.vm_zone_stat_free, Some(0xffff_ffff_8220_0100));
        let all = VirtualSensors::new(&Symbols::parse(MAP), &btf(true), &loc()).unwrap();
        assert_eq!(all.nr_switches, Some(0x1008));
    }

    #[test]
    fn without_jiffies_there_is_no_view() {
        let map = MAP.replace("jiffies_64", "jiffies");
        let e = VirtualSensors::new(&Symbols::parse(&map), &btf(true), &loc()).unwrap_err();
        assert!(matches!(e, VirtualError::NoSymbol("jiffies_64")), "{e}");
    }
}
