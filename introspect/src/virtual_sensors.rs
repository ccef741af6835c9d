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
//! | `IRQS` | Σ per-CPU `kstat.irqs_sum`, as the patched kernel counts it |
//! | `NET_RX_PACKETS` | Σ per-CPU `softnet_data.processed` (u32 each, summed as u64): every packet the network core received, **loopback included** — the patched kernel's counts every device but loopback, so the two differ on a guest that talks to itself |
//! | `TCP_ACCEPTS` | Σ per-CPU `init_net.mib.tcp_statistics->mibs[TCP_MIB_PASSIVEOPENS]`, as the patched kernel counts it |
//!
//! Each sensor needs its own symbols and fields: one the kernel lacks is left out of the view and
//! listed in [`VirtualSensors::unresolved`]; only `TIMER_TICKS` is required. Per-CPU sums run
//! over CPUs `0..nr_cpu_ids` (at most 8,192) at `__per_cpu_offset[cpu]`. The Progress Box
//! sensors (`IRQS`, `NET_RX_PACKETS`, `TCP_ACCEPTS`) have no contract (threshold `u64::MAX`)
//! until the operator gives one, as on the patched kernel. `TCP_ACCEPTS` follows a per-CPU
//! pointer the kernel allocates while it boots: while it is still NULL the sensor is left out of
//! the sample.
//!
//! What a stock kernel cannot say: the per-user fork rate, failed forks, entries to the OOM
//! handler, a full file table. Those sensors are absent from the view, not zero.

use crate::btf::Btf;
use crate::btf::MemberKind;
use crate::cpus::{CpuCount, RqLayout, Runqueues};
use crate::kernel::{KernelLocation, Symbols};
use crate::layout::{int, member_at, pointer, FieldError, Unresolved, UNKNOWN_RELEASE};
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

/// Width of a per-CPU counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Width {
    /// `unsigned int`.
    U32,
    /// `unsigned long` / `u64`.
    U64,
}

/// Where `TCP_ACCEPTS` is: `init_net.mib.tcp_statistics`, a per-CPU pointer to `struct tcp_mib`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TcpAccepts {
    /// Kernel virtual address (slid) of `init_net.mib.tcp_statistics`.
    pointer: u64,
    /// Offset of `mibs[TCP_MIB_PASSIVEOPENS]` in `struct tcp_mib`.
    counter: u64,
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
    /// Per-CPU offset of `kstat.irqs_sum`.
    irqs: Option<u64>,
    /// Per-CPU offset of `softnet_data.processed` (u32).
    net_rx: Option<u64>,
    /// `init_net`'s TCP counters.
    tcp_accepts: Option<TcpAccepts>,
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
        let irqs = (|| {
            let ks = btf.struct_layout("kernel_stat")?;
            Ok(sym("kstat")?.wrapping_add(int(btf, &ks, "irqs_sum", &[8])?))
        })();
        let net_rx = (|| {
            let sd = btf.struct_layout("softnet_data")?;
            Ok(sym("softnet_data")?.wrapping_add(int(btf, &sd, "processed", &[4])?))
        })();
        let tcp_accepts = (|| {
            let net = btf.struct_layout("net")?;
            let off = pointer(btf, &net, "mib.tcp_statistics")?;
            let (_, m) = member_at(btf, &net, "mib.tcp_statistics")?;
            let mib = btf.struct_layout_by_id(btf.pointee(m.type_id)?)?;
            if mib.name != "tcp_mib" {
                return Err(FieldError::Shape {
                    what: "net.mib.tcp_statistics".into(),
                    found: format!("a pointer to {:?}", mib.name),
                    expected: "a pointer to struct tcp_mib".into(),
                });
            }
            let len = match mib.member("mibs")?.kind {
                MemberKind::Array {
                    elem_size: 8, len, ..
                } => len,
                _ => {
                    return Err(FieldError::NoneOf(
                        "tcp_mib.mibs is not an array of unsigned long",
                    ))
                }
            };
            let index = constant("TCP_MIB_PASSIVEOPENS")?;
            // The enum's end; `TCP_MIB_MAX` is a macro for it (include/net/snmp.h).
            let max = constant("__TCP_MIB_MAX")?;
            if index >= max || index >= u64::from(len) {
                return Err(FieldError::Shape {
                    what: "tcp_mib.mibs[TCP_MIB_PASSIVEOPENS]".into(),
                    found: format!("index {index}"),
                    expected: format!("an index below __TCP_MIB_MAX ({max}) and the array's {len}"),
                });
            }
            Ok(TcpAccepts {
                pointer: slid("init_net")?.wrapping_add(off),
                // Both below 4096 (`constant`) and a struct's size: no overflow.
                counter: mib.offset("mibs")? + index * 8,
            })
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
                    "the per-CPU sensors CONTEXT_SWITCHES, OOM_KILLS, IRQS, NET_RX_PACKETS and \
                     TCP_ACCEPTS",
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
            irqs: keep(
                irqs,
                "kernel_stat.irqs_sum",
                "per-CPU symbol kstat and kernel_stat.irqs_sum (unsigned long)",
                "the IRQS sensor",
            ),
            net_rx: keep(
                net_rx,
                "softnet_data.processed",
                "per-CPU symbol softnet_data and softnet_data.processed (unsigned int)",
                "the NET_RX_PACKETS sensor",
            ),
            tcp_accepts: tcp_accepts
                .map_err(|reason| {
                    keep(
                        Err(reason),
                        "net.mib.tcp_statistics",
                        "symbol init_net, net.mib.tcp_statistics (per-CPU pointer to \
                         struct tcp_mib), tcp_mib.mibs[] of unsigned long and enum \
                         constants TCP_MIB_PASSIVEOPENS < __TCP_MIB_MAX (CONFIG_INET)",
                        "the TCP_ACCEPTS sensor",
                    )
                })
                .ok(),
            per_cpu,
            runqueues,
            unresolved,
        })
    }

    /// The sensors left out of the view, each with the symbol or field it lacks.
    pub fn unresolved(&self) -> &[Unresolved] {
        &self.unresolved
    }

    /// Σ over CPUs `0..cpus` of the counter of `width` at per-CPU address `var` (as the kernel
    /// sums its counters: wrapping).
    fn per_cpu_sum(
        km: &KernelMem,
        pc: PerCpu,
        var: u64,
        cpus: u32,
        width: Width,
    ) -> Result<u64, VirtualError> {
        let mut sum = 0u64;
        for cpu in 0..u64::from(cpus) {
            // `cpus` <= MAX_CPUS: no overflow.
            let off = km.read_u64(pc.offsets.wrapping_add(cpu * 8), "__per_cpu_offset")?;
            let at = off.wrapping_add(var);
            let v = match width {
                Width::U32 => u64::from(km.read_u32(at, "per-CPU counter")?),
                Width::U64 => km.read_u64(at, "per-CPU counter")?,
            };
            sum = sum.wrapping_add(v);
        }
        Ok(sum)
    }

    /// Whether a sensor of the view sums over CPUs.
    fn needs_cpus(&self) -> bool {
        self.nr_switches.is_some()
            || self.vm_event_oom_kill.is_some()
            || self.irqs.is_some()
            || self.net_rx.is_some()
            || self.tcp_accepts.is_some()
    }

    /// Samples the counters into a Sensor Box view (at `gpa` 0, no externalized state).
    pub fn sample(&self, km: &KernelMem) -> Result<SensorBox, VirtualError> {
        let cpus = match self.per_cpu {
            Some(pc) if self.needs_cpus() => {
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
                Self::per_cpu_sum(km, pc, var, n, Width::U64)?,
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
                Self::per_cpu_sum(km, pc, var, n, Width::U64)?,
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
        // The Progress Box: no contract until the operator gives one.
        if let (Some(var), Some((pc, n))) = (self.irqs, cpus) {
            sensors.push(sensor(
                ids::IRQS,
                SensorClass::Progress,
                0,
                u64::MAX,
                Self::per_cpu_sum(km, pc, var, n, Width::U64)?,
                "IRQS",
            ));
        }
        if let (Some(var), Some((pc, n))) = (self.net_rx, cpus) {
            sensors.push(sensor(
                ids::NET_RX_PACKETS,
                SensorClass::Progress,
                0,
                u64::MAX,
                Self::per_cpu_sum(km, pc, var, n, Width::U32)?,
                "NET_RX_PACKETS",
            ));
        }
        if let (Some(t), Some((pc, n))) = (self.tcp_accepts, cpus) {
            // A per-CPU pointer: every CPU's copy is at it plus that CPU's offset. NULL until the
            // kernel's inet init allocates it; the kernel aligns it for its unsigned longs; every
            // read through it is checked.
            let mib = km.read_u64(t.pointer, "init_net.mib.tcp_statistics")?;
            if mib % 8 != 0 {
                return Err(VirtualError::Implausible(format!(
                    "init_net.mib.tcp_statistics {mib:#x} (not 8-byte aligned)"
                )));
            }
            if mib != 0 {
                sensors.push(sensor(
                    ids::TCP_ACCEPTS,
                    SensorClass::Progress,
                    0,
                    u64::MAX,
                    Self::per_cpu_sum(km, pc, mib.wrapping_add(t.counter), n, Width::U64)?,
                    "TCP_ACCEPTS",
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
            [
                "runqueues",
                "nr_threads",
                "total_forks",
                "rq.nr_switches",
                "kernel_stat.irqs_sum",
                "softnet_data.processed",
                "net.mib.tcp_statistics"
            ]
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

    /// The Progress Box's types as Linux 6.1 has them; `omit` renames one field or constant
    /// away, `passive` is `TCP_MIB_PASSIVEOPENS`.
    fn progress_btf(omit: &str, passive: i32) -> Btf {
        let name = |n: &'static str| if n == omit { "renamed" } else { n };
        let mut b = B::new();
        let int = b.int("int", 4, true);
        let uint = b.int("unsigned int", 4, false);
        let ulong = b.int("long unsigned int", 8, false);
        let softirqs = b.array(uint, int, 10);
        b.struct_(
            "kernel_stat",
            48,
            &[
                (name("irqs_sum"), ulong, 0, 0),
                ("softirqs", softirqs, 64, 0),
            ],
        );
        // `processed` at byte 12: a u32 that is not 8-byte aligned, next to another counter.
        b.struct_(
            "softnet_data",
            64,
            &[
                ("input_queue_head", uint, 64, 0),
                (name("processed"), uint, 96, 0),
                ("time_squeeze", uint, 128, 0),
            ],
        );
        let mibs = b.array(ulong, int, 16);
        let tcp_mib = b.struct_("tcp_mib", 128, &[("mibs", mibs, 0, 0)]);
        let ptr = b.ptr(tcp_mib);
        let netns_mib = b.struct_(
            "netns_mib",
            16,
            &[
                ("ip_statistics", ptr, 0, 0),
                (name("tcp_statistics"), ptr, 64, 0),
            ],
        );
        b.struct_("net", 64, &[("ns", int, 0, 0), ("mib", netns_mib, 256, 0)]);
        b.enum_(
            "",
            false,
            &[
                ("TCP_MIB_NUM", 0),
                ("TCP_MIB_ACTIVEOPENS", 5),
                (name("TCP_MIB_PASSIVEOPENS"), passive),
                ("__TCP_MIB_MAX", 16),
            ],
        );
        Btf::parse(&b.build()).unwrap()
    }

    /// Slid image addresses are at physical `va - 0xffffffff82200000 + IMAGE`.
    const IMAGE: u64 = 0x220_0000;
    const PROGRESS_MAP: &str = "ffffffff82000000 D jiffies_64\nffffffff82000010 D nr_cpu_ids\n\
        ffffffff82000020 D __per_cpu_offset\nffffffff82000100 D init_net\n\
        0000000000003000 D kstat\n0000000000003400 D softnet_data\n";
    /// CPU `c`'s per-CPU area starts at physical `AREA + c * 0x4000`.
    const AREA: u64 = IMAGE + 0x1000;
    /// `init_net.mib.tcp_statistics`: a per-CPU address.
    const TCP_MIB: u64 = 0x3800;

    /// Two CPUs' counters; `tcp_statistics` is what `init_net.mib.tcp_statistics` holds.
    fn progress_memory(tcp_statistics: u64) -> crate::mem::VecMem {
        let mut m = vec![0u8; 0x1_0000];
        let mut put = |phys: u64, bytes: &[u8]| {
            let at = usize::try_from(phys - IMAGE).unwrap();
            m[at..at + bytes.len()].copy_from_slice(bytes);
        };
        put(IMAGE, &77u64.to_le_bytes()); // jiffies_64
        put(IMAGE + 0x10, &2u64.to_le_bytes()); // nr_cpu_ids
        let pob = loc().page_offset_base;
        for (cpu, (irqs, rx, accepts)) in [(1000u64, 0xffff_fff0u32, 7u64), (234, 0x20, 5)]
            .into_iter()
            .enumerate()
        {
            let area = AREA + 0x4000 * u64::try_from(cpu).unwrap();
            put(
                IMAGE + 0x20 + 8 * u64::try_from(cpu).unwrap(),
                &(pob + area).to_le_bytes(),
            );
            put(area + 0x3000, &irqs.to_le_bytes());
            put(area + 0x3400 + 8, &0xdead_beefu32.to_le_bytes());
            put(area + 0x3400 + 12, &rx.to_le_bytes());
            put(area + 0x3400 + 16, &0xdead_beefu32.to_le_bytes());
            put(area + TCP_MIB + 5 * 8, &99u64.to_le_bytes()); // ACTIVEOPENS
            put(area + TCP_MIB + 6 * 8, &accepts.to_le_bytes());
        }
        // init_net.mib.tcp_statistics: init_net + 32 (mib) + 8.
        put(IMAGE + 0x100 + 40, &tcp_statistics.to_le_bytes());
        crate::mem::VecMem::new(IMAGE, m)
    }

    fn sample_progress(v: &VirtualSensors, mem: &crate::mem::VecMem) -> SensorBox {
        v.sample(&KernelMem::new(mem, loc())).unwrap()
    }

    fn value(sb: &SensorBox, id: u32) -> Option<u64> {
        sb.sensors.iter().find(|s| s.id == id).map(|s| s.value)
    }

    #[test]
    fn progress_box_sensors_sum_every_cpu() {
        let v = VirtualSensors::new_for(
            &Symbols::parse(PROGRESS_MAP),
            &progress_btf("", 6),
            &loc(),
            "6.1.0",
        )
        .unwrap();
        let fields: Vec<&str> = v.unresolved().iter().map(|u| u.field).collect();
        assert!(
            !fields
                .iter()
                .any(|f| f.contains("irqs") || f.contains("softnet") || f.contains("tcp")),
            "{fields:?}"
        );
        let sb = sample_progress(&v, &progress_memory(TCP_MIB));
        let ids: Vec<u32> = sb.sensors.iter().map(|s| s.id).collect();
        assert_eq!(
            ids,
            [
                ids::TIMER_TICKS,
                ids::IRQS,
                ids::NET_RX_PACKETS,
                ids::TCP_ACCEPTS
            ]
        );
        assert_eq!(value(&sb, ids::IRQS), Some(1234));
        // u32 per CPU, summed as u64: no wrap at 2^32.
        assert_eq!(value(&sb, ids::NET_RX_PACKETS), Some(0x1_0000_0010));
        assert_eq!(value(&sb, ids::TCP_ACCEPTS), Some(12));
        for (s, name) in sb.sensors[1..]
            .iter()
            .zip(["IRQS", "NET_RX_PACKETS", "TCP_ACCEPTS"])
        {
            assert_eq!(s.name, name);
            assert_eq!(s.class, SensorClass::Progress);
            assert_eq!(s.threshold, u64::MAX);
            assert_eq!(s.flags, FLAG_VALID);
            assert_eq!(s.updated, 77);
        }
    }

    #[test]
    fn a_missing_progress_box_field_drops_only_its_sensor() {
        let cases = [
            (
                "irqs_sum",
                6,
                "kernel_stat.irqs_sum",
                ids::IRQS,
                "the IRQS sensor",
            ),
            (
                "processed",
                6,
                "softnet_data.processed",
                ids::NET_RX_PACKETS,
                "the NET_RX_PACKETS sensor",
            ),
            (
                "tcp_statistics",
                6,
                "net.mib.tcp_statistics",
                ids::TCP_ACCEPTS,
                "the TCP_ACCEPTS sensor",
            ),
            (
                "TCP_MIB_PASSIVEOPENS",
                6,
                "net.mib.tcp_statistics",
                ids::TCP_ACCEPTS,
                "the TCP_ACCEPTS sensor",
            ),
            // An index the array (and __TCP_MIB_MAX) cannot hold.
            (
                "",
                16,
                "net.mib.tcp_statistics",
                ids::TCP_ACCEPTS,
                "the TCP_ACCEPTS sensor",
            ),
        ];
        for (omit, passive, field, id, disables) in cases {
            let v = VirtualSensors::new_for(
                &Symbols::parse(PROGRESS_MAP),
                &progress_btf(omit, passive),
                &loc(),
                "6.1.0",
            )
            .unwrap();
            let ours: Vec<&Unresolved> = v
                .unresolved()
                .iter()
                .filter(|u| {
                    [
                        "kernel_stat.irqs_sum",
                        "softnet_data.processed",
                        "net.mib.tcp_statistics",
                    ]
                    .contains(&u.field)
                })
                .collect();
            assert_eq!(ours.len(), 1, "{omit}: {ours:?}");
            assert_eq!(ours[0].field, field, "{omit}");
            assert_eq!(ours[0].disables, disables, "{omit}");
            assert!(
                ours[0].to_string().starts_with("kernel 6.1.0: no "),
                "{}",
                ours[0]
            );
            let sb = sample_progress(&v, &progress_memory(TCP_MIB));
            assert_eq!(value(&sb, id), None, "{omit}");
            let others = [ids::IRQS, ids::NET_RX_PACKETS, ids::TCP_ACCEPTS];
            for other in others.into_iter().filter(|&o| o != id) {
                assert!(value(&sb, other).is_some(), "{omit}: {other} missing");
            }
        }
    }

    #[test]
    fn a_missing_progress_box_symbol_drops_only_its_sensor() {
        for (symbol, field) in [
            ("kstat", "kernel_stat.irqs_sum"),
            ("softnet_data", "softnet_data.processed"),
            ("init_net", "net.mib.tcp_statistics"),
        ] {
            let map = PROGRESS_MAP.replace(&format!(" {symbol}\n"), " other\n");
            let v =
                VirtualSensors::new(&Symbols::parse(&map), &progress_btf("", 6), &loc()).unwrap();
            let u = v.unresolved().iter().find(|u| u.field == field);
            assert!(
                u.is_some_and(|u| u.reason.contains(symbol)),
                "{symbol}: {u:?}"
            );
            let sb = sample_progress(&v, &progress_memory(TCP_MIB));
            assert_eq!(sb.sensors.len(), 3, "{symbol}");
        }
        // Without the per-CPU offsets there is no per-CPU sum at all.
        let map = PROGRESS_MAP.replace("__per_cpu_offset", "other");
        let v = VirtualSensors::new(&Symbols::parse(&map), &progress_btf("", 6), &loc()).unwrap();
        assert!(v.unresolved().iter().any(|u| u.field == "nr_cpu_ids"
            && u.disables.contains("IRQS, NET_RX_PACKETS and TCP_ACCEPTS")));
        let sb = sample_progress(&v, &progress_memory(TCP_MIB));
        assert_eq!(sb.sensors.len(), 1);
    }

    #[test]
    fn tcp_accepts_waits_for_its_counters_and_refuses_wild_ones() {
        let v = VirtualSensors::new(&Symbols::parse(PROGRESS_MAP), &progress_btf("", 6), &loc())
            .unwrap();
        // Not allocated yet: left out of this sample, the others are there.
        let sb = sample_progress(&v, &progress_memory(0));
        assert_eq!(value(&sb, ids::TCP_ACCEPTS), None);
        assert_eq!(value(&sb, ids::IRQS), Some(1234));
        // A pointer whose copies are not where memory can be read: an error, not a value.
        let mem = progress_memory(0x10_0000_0000);
        let e = v.sample(&KernelMem::new(&mem, loc())).unwrap_err();
        assert!(matches!(e, VirtualError::Task(_)), "{e}");
        // Unaligned: refused.
        let mem = progress_memory(TCP_MIB + 3);
        let e = v.sample(&KernelMem::new(&mem, loc())).unwrap_err();
        assert!(matches!(e, VirtualError::Implausible(_)), "{e}");
    }

    #[test]
    fn without_jiffies_there_is_no_view() {
        let map = MAP.replace("jiffies_64", "jiffies");
        let e = VirtualSensors::new(&Symbols::parse(&map), &btf(true), &loc()).unwrap_err();
        assert!(matches!(e, VirtualError::NoSymbol("jiffies_64")), "{e}");
    }
}
