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
//! | `TOTAL_FORKS` (virtual only, id 100) | `total_forks`; a monitor derives the fork rate from two samples |
//!
//! What a stock kernel cannot say: the per-user fork rate, failed forks, entries to the OOM
//! handler, a full file table. Those sensors are absent from the view, not zero.

use crate::btf::Btf;
use crate::kernel::{KernelLocation, Symbols};
use crate::sensorbox::{ids, Header, Sensor, SensorBox, SensorClass, FLAG_LOWER_BOUND, FLAG_VALID};
use crate::tasks::{KernelMem, TaskError};

/// Id of the virtual `TOTAL_FORKS` sensor (outside the Sensor Box's numbering).
pub const TOTAL_FORKS: u32 = 100;
/// Most CPUs we sum over.
const MAX_CPUS: u32 = 8192;

/// Why the view could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum VirtualError {
    /// A symbol is missing.
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

/// Addresses and offsets, resolved once.
#[derive(Clone, Debug)]
pub struct VirtualSensors {
    jiffies_64: u64,
    nr_threads: u64,
    total_forks: u64,
    nr_cpu_ids: u64,
    per_cpu_offset: u64,
    runqueues: u64,
    rq_nr_switches: u64,
    vm_zone_stat_free: u64,
    vm_event_oom_kill: Option<u64>,
}

impl VirtualSensors {
    /// Resolves addresses (slid by `loc`) and offsets (from BTF).
    pub fn new(syms: &Symbols, btf: &Btf, loc: &KernelLocation) -> Result<Self, VirtualError> {
        let sym = |n: &'static str| syms.get(n).ok_or(VirtualError::NoSymbol(n));
        let slid = |n: &'static str| sym(n).map(|a| a.wrapping_add(loc.slide));
        let free_idx = u64::try_from(btf.enum_constant("NR_FREE_PAGES")?).unwrap_or(0);
        let oom = match (syms.get("vm_event_states"), btf.enum_constant("OOM_KILL")) {
            (Some(states), Ok(idx)) => {
                let events = btf.field_offset("vm_event_state", "event")?;
                Some(states + events + u64::try_from(idx).unwrap_or(0) * 8)
            }
            _ => None,
        };
        Ok(Self {
            jiffies_64: slid("jiffies_64")?,
            nr_threads: slid("nr_threads")?,
            total_forks: slid("total_forks")?,
            nr_cpu_ids: slid("nr_cpu_ids")?,
            per_cpu_offset: slid("__per_cpu_offset")?,
            // Per-CPU symbols are offsets into each CPU's area and are not slid.
            runqueues: sym("runqueues")?,
            rq_nr_switches: btf.field_offset("rq", "nr_switches")?,
            vm_zone_stat_free: slid("vm_zone_stat")? + free_idx * 8,
            vm_event_oom_kill: oom,
        })
    }

    fn per_cpu_sum(&self, km: &KernelMem, var: u64, cpus: u32) -> Result<u64, VirtualError> {
        let mut sum = 0u64;
        for cpu in 0..u64::from(cpus) {
            let off = km.read_u64(self.per_cpu_offset + cpu * 8, "__per_cpu_offset")?;
            sum = sum.wrapping_add(km.read_u64(off.wrapping_add(var), "per-CPU counter")?);
        }
        Ok(sum)
    }

    /// Samples the counters into a Sensor Box view (at `gpa` 0, no externalized state).
    pub fn sample(&self, km: &KernelMem) -> Result<SensorBox, VirtualError> {
        let cpus = (km.read_u64(self.nr_cpu_ids, "nr_cpu_ids")? & 0xffff_ffff) as u32;
        if cpus == 0 || cpus > MAX_CPUS {
            return Err(VirtualError::Implausible(format!("nr_cpu_ids {cpus}")));
        }
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
        let mut sensors = vec![
            sensor(
                ids::TIMER_TICKS,
                SensorClass::Progress,
                0,
                1000,
                jiffies,
                "TIMER_TICKS",
            ),
            sensor(
                ids::CONTEXT_SWITCHES,
                SensorClass::Progress,
                0,
                1000,
                self.per_cpu_sum(km, self.runqueues + self.rq_nr_switches, cpus)?,
                "CONTEXT_SWITCHES",
            ),
            sensor(
                ids::NPROCS,
                SensorClass::Level,
                0,
                4096,
                km.read_u64(self.nr_threads, "nr_threads")? & 0xffff_ffff,
                "NPROCS",
            ),
            sensor(
                ids::FREE_PAGES,
                SensorClass::Level,
                FLAG_LOWER_BOUND,
                1024,
                km.read_u64(self.vm_zone_stat_free, "vm_zone_stat")?,
                "FREE_PAGES",
            ),
            sensor(
                TOTAL_FORKS,
                SensorClass::Progress,
                0,
                u64::MAX,
                km.read_u64(self.total_forks, "total_forks")?,
                "TOTAL_FORKS",
            ),
        ];
        if let Some(var) = self.vm_event_oom_kill {
            sensors.push(sensor(
                ids::OOM_KILLS,
                SensorClass::Pressure,
                0,
                0,
                self.per_cpu_sum(km, var, cpus)?,
                "OOM_KILLS",
            ));
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
