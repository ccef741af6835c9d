//! Text tables of what introspection reads, for command-line tools (`bdvmm ctl`, `rdma-bridge
//! ctl`): the Sensor Box and the process table.

use crate::sensorbox::SensorBox;
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
            s.id, s.name, class, s.value, s.threshold, state
        );
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
