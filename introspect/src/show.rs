//! Text tables of what introspection reads, for command-line tools (`bdvmm ctl`, `rdma-bridge
//! ctl`): the Sensor Box and the process table.

use crate::sensorbox::{Sensor, SensorBox, FLAG_LOWER_BOUND};
use crate::tasks::Process;

/// Prints a Sensor Box as a table.
pub fn print_sensor_box(sb: &SensorBox) {
    println!(
        "Sensor Box v{} at {:#x}: boot_id {:016x}, seq {}, jiffies {}, HZ {}",
        sb.header.version,
        sb.gpa,
        sb.header.boot_id,
        sb.header.seq,
        sb.header.jiffies,
        sb.header.hz
    );
    println!(
        "{:>4} {:<22} {:<9} {:>20} {:>20} {:>6}",
        "ID", "NAME", "CLASS", "VALUE", "THRESHOLD", "STATE"
    );
    for s in &sb.sensors {
        let class = format!("{:?}", s.class).to_lowercase();
        let stalled = s
            .stalled_ms(sb.header.jiffies, sb.header.hz)
            .filter(|&ms| s.threshold > 0 && ms > s.threshold);
        let state = if s.level_violated() || stalled.is_some() {
            "BAD"
        } else {
            "ok"
        };
        println!(
            "{:>4} {:<22} {:<9} {:>20} {:>20} {:>6}",
            s.id,
            s.name,
            class,
            s.value,
            threshold(s),
            state
        );
    }
}

/// A sensor's threshold as the table shows it: `-` for `u64::MAX`, which no value can break
/// (no contract, e.g. the Progress Box sensors until the operator sets one), unless it is a
/// lower bound.
fn threshold(s: &Sensor) -> String {
    if s.threshold == u64::MAX && s.flags & FLAG_LOWER_BOUND == 0 {
        "-".to_owned()
    } else {
        s.threshold.to_string()
    }
}

/// Prints a process table like `ps -ef`, with the tree and memory columns healers use.
pub fn print_process_table(table: &[Process]) {
    println!(
        "{:>6} {:>7} {:>7} {:1} {:>4} {:>9} {:>5} {:>5} CMD",
        "UID", "PID", "PPID", "S", "THR", "RSS_KB", "DEPTH", "CHILD"
    );
    for p in table {
        let t = &p.task;
        let rss_kb = (t.rss_anon + t.rss_file + t.rss_shmem) * 4;
        let cmd = if t.kthread {
            format!("[{}]", t.comm)
        } else {
            t.comm.clone()
        };
        println!(
            "{:>6} {:>7} {:>7} {:1} {:>4} {:>9} {:>5} {:>5} {cmd}",
            t.uid,
            t.pid,
            t.ppid,
            t.state,
            p.threads.len() + 1,
            rss_kb,
            p.depth,
            p.children
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensorbox::{ids, SensorClass, FLAG_VALID};

    fn sensor(threshold: u64, flags: u16) -> Sensor {
        Sensor {
            id: ids::IRQS,
            class: SensorClass::Progress,
            flags: flags | FLAG_VALID,
            threshold,
            value: 5,
            updated: 0,
            name: "IRQS".into(),
        }
    }

    #[test]
    fn no_contract_shows_as_a_dash() {
        assert_eq!(threshold(&sensor(u64::MAX, 0)), "-");
        assert_eq!(threshold(&sensor(2000, 0)), "2000");
        assert_eq!(
            threshold(&sensor(u64::MAX, FLAG_LOWER_BOUND)),
            u64::MAX.to_string()
        );
    }
}
