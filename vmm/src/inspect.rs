//! `bdvmm ctl ps` and `bdvmm ctl sb`: a running guest's process table and Sensor Box, read by
//! introspection through the control API (memfd + pause lock + registers).
//!
//! On a patched guest nothing else is needed: the Sensor Box names `init_task` and the kernel's
//! BTF blob in guest memory. On a stock guest, give `--system-map` and `--vmlinux` (for BTF).

use std::path::Path;
use std::time::Duration;

use introspect::consistency::{Locked, Pauser};
use introspect::mem::{MappedMem, PhysMem, Range};
use introspect::sensorbox::{self, SensorBox};
use introspect::target::{KernelFiles, Target};
use introspect::tasks::Process;

use crate::api::{ApiClient, MemoryReply};

/// Maps a guest's memfd (as the `memory` API call hands it out) read-write.
pub fn map_memory(file: std::fs::File, map: &MemoryReply) -> Result<MappedMem, String> {
    let ranges = map
        .ranges
        .iter()
        .map(|r| Range {
            gpa: r.gpa,
            size: r.size,
            offset: r.offset,
        })
        .collect();
    MappedMem::new(file, map.size, ranges, true).map_err(|e| e.to_string())
}

/// Maps the guest's memfd read-write (repairs write through it) from the API.
pub fn map_guest(client: &mut ApiClient) -> Result<(MappedMem, SbRange), String> {
    let (file, map) = client.memory().map_err(|e| e.to_string())?;
    let mem = map_memory(file, &map)?;
    Ok((
        mem,
        SbRange {
            gpa: map.backdoor.gpa,
            size: map.backdoor.size,
        },
    ))
}

/// Where the Sensor Box may be.
#[derive(Clone, Copy, Debug)]
pub struct SbRange {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size.
    pub size: u64,
}

/// Reads the Sensor Box (no pause needed: the sequence counter makes the copy consistent).
pub fn sensor_box(mem: &dyn PhysMem, range: SbRange) -> Result<SensorBox, String> {
    sensorbox::read(mem, range.gpa, range.size, 1000).map_err(|e| e.to_string())
}

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
        let state = if s.level_violated() { "BAD" } else { "ok" };
        println!(
            "{:>4} {:<22} {:<9} {:>20} {:>20} {:>6}",
            s.id, s.name, class, s.value, s.threshold, state
        );
    }
}

/// bdvmm's API as the pause lock of [`consistency::read_quiescent`].
struct ApiPauser<'a>(&'a mut ApiClient);

impl Pauser for ApiPauser<'_> {
    fn pause(&mut self) -> Result<(), String> {
        self.0
            .pause(Some(Duration::from_secs(5)))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.0.resume().map(|_| ()).map_err(|e| e.to_string())
    }
}

/// How long `ps` waits for a moment when no fork or exit holds `tasklist_lock`.
const QUIESCE_TIMEOUT: Duration = Duration::from_millis(500);

/// Reads the process table while the guest is paused at a moment when `tasklist_lock` is not
/// write-held (or, after a timeout, anyway: `forced`).
pub fn process_table(
    client: &mut ApiClient,
    system_map: Option<&Path>,
    vmlinux: Option<&Path>,
) -> Result<Locked<Vec<Process>>, String> {
    let (mem, range) = map_guest(client)?;
    let files = match (system_map, vmlinux) {
        (Some(system_map), Some(vmlinux)) => KernelFiles::Files {
            system_map,
            vmlinux,
        },
        _ => KernelFiles::SensorBox {
            gpa: range.gpa,
            size: range.size,
        },
    };
    // The kernel's location and layouts do not change while it runs: find them once, paused.
    client
        .pause(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let found = client
        .regs(0)
        .map_err(|e| e.to_string())
        .and_then(|regs| Target::locate(&mem, regs.cr3, regs.cr4, files));
    client.resume().map_err(|e| e.to_string())?;
    found?.process_table(&mem, &mut ApiPauser(client), QUIESCE_TIMEOUT)
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
