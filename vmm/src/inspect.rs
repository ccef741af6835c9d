//! `bdvmm ctl ps` and `bdvmm ctl sb`: a running guest's process table and Sensor Box, read by
//! introspection through the control API (memfd + pause lock + registers).
//!
//! Nothing else is needed: on a patched guest the Sensor Box names `init_task` and the kernel's
//! BTF blob; on a stock guest the kernel's own symbol table (kallsyms) and BTF are found in its
//! memory. `--system-map` and `--vmlinux` override that for a stock guest.
//! The tables are printed by [`introspect::show`].

use std::path::Path;
use std::time::Duration;

use introspect::consistency::{Locked, Pausable};
use introspect::mem::{MappedMem, MemError};
use introspect::sensorbox::{self, SbError, SensorBox};
use introspect::target::{KernelFiles, Target, TargetError};
use introspect::tasks::{Process, TaskError};

use crate::api::{map_memory, ApiClient, ApiError};

/// Why `bdvmm ctl ps` or `sb` failed: bdvmm's API, or the guest's memory.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The control API.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Mapping the memfd.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// The Sensor Box.
    #[error(transparent)]
    SensorBox(#[from] SbError),
    /// Locating the kernel.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// Walking the task list.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// A stock guest's virtual sensors.
    #[error(transparent)]
    Virtual(#[from] introspect::virtual_sensors::VirtualError),
}

/// Maps the guest's memfd read-write (repairs write through it) from the API.
pub fn map_guest(client: &mut ApiClient) -> Result<(MappedMem, SbRange), InspectError> {
    let (file, map) = client.memory()?;
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

/// Reads the Sensor Box (no pause needed: the sequence counter makes the copy consistent); on a
/// stock guest, which has none, its virtual sensors, from the kernel found in its memory.
pub fn sensor_box(
    client: &mut ApiClient,
    mem: &MappedMem,
    range: SbRange,
) -> Result<SensorBox, InspectError> {
    match sensorbox::read(mem, range.gpa, range.size, 1000) {
        Err(SbError::BadMagic(_)) => virtual_sensor_box(client, mem),
        r => Ok(r?),
    }
}

fn virtual_sensor_box(client: &mut ApiClient, mem: &MappedMem) -> Result<SensorBox, InspectError> {
    let mut pauser = ApiPauser(client);
    introspect::virtual_sensors::sample_discovered(mem, &mut pauser, |p| {
        let r = p.0.regs(0)?;
        Ok::<_, InspectError>((r.cr3, r.cr4))
    })
}

/// bdvmm's API as the project's [`Pausable`] (with a 5 s lease).
struct ApiPauser<'a>(&'a mut ApiClient);

impl Pausable for ApiPauser<'_> {
    type Error = ApiError;
    fn pause(&mut self) -> Result<(), ApiError> {
        self.0.pause(Some(Duration::from_secs(5))).map(|_| ())
    }
    fn resume(&mut self) -> Result<(), ApiError> {
        self.0.resume().map(|_| ())
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
) -> Result<Locked<Vec<Process>>, InspectError> {
    let (mem, range) = map_guest(client)?;
    let files = match (system_map, vmlinux) {
        (Some(system_map), Some(vmlinux)) => KernelFiles::Files {
            system_map,
            vmlinux,
        },
        _ => KernelFiles::Auto {
            gpa: range.gpa,
            size: range.size,
        },
    };
    // The kernel's location and layouts do not change while it runs: find them once, paused.
    let mut pauser = ApiPauser(client);
    let target = Target::locate_paused(
        &mem,
        &mut pauser,
        |p| {
            let r = p.0.regs(0)?;
            Ok::<_, InspectError>((r.cr3, r.cr4))
        },
        files,
    )?;
    target.process_table(&mem, &mut pauser, QUIESCE_TIMEOUT)
}
