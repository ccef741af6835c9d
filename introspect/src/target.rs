//! Everything a reader needs to walk a guest's task list, found once per boot: where the kernel
//! is, its BTF, `init_task` and `tasklist_lock`.
//!
//! A patched guest describes itself in the Sensor Box's externalized-state descriptor, so nothing
//! but guest memory and CR3 is needed; a stock guest needs its `System.map` and its `vmlinux` (for
//! BTF). The kernel's location and layouts do not change while it runs, so callers find the
//! [`Target`] once, with the guest paused, and reuse it for every walk.

use std::path::Path;

use crate::btf::Btf;
use crate::consistency::{self, Locked, Pauser};
use crate::kernel::{self, KernelLocation, Symbols};
use crate::mem::PhysMem;
use crate::sensorbox;
use crate::tasks::{self, KernelMem, Limits, Process, TaskLayout, TasklistLock};

/// Largest BTF blob copied out of a guest.
pub const MAX_GUEST_BTF: u64 = 64 << 20;

/// Where the kernel's symbols and types come from.
#[derive(Clone, Copy, Debug)]
pub enum KernelFiles<'a> {
    /// The patched guest's Sensor Box descriptor, in the backdoor range `[gpa, gpa + size)`.
    SensorBox {
        /// Guest-physical start of the backdoor range.
        gpa: u64,
        /// Its size.
        size: u64,
    },
    /// A stock guest: its System.map and vmlinux (for BTF).
    Files {
        /// `System.map` of the guest's kernel.
        system_map: &'a Path,
        /// The guest's `vmlinux` (only its `.BTF` section is used).
        vmlinux: &'a Path,
    },
}

/// A located guest kernel, ready for task-list walks.
pub struct Target {
    /// Where the kernel sits.
    pub loc: KernelLocation,
    /// Its types.
    pub btf: Btf,
    /// Layout of `task_struct` and friends.
    pub layout: TaskLayout,
    /// Virtual address of `init_task`.
    pub init_task: u64,
    /// `tasklist_lock`, to wait for a moment when no fork or exit holds it.
    pub tasklist_lock: TasklistLock,
}

impl Target {
    /// Locates the kernel from `cr3`/`cr4` (read with the guest paused) and `files`.
    pub fn locate(
        mem: &dyn PhysMem,
        cr3: u64,
        cr4: u64,
        files: KernelFiles<'_>,
    ) -> Result<Target, String> {
        let (loc, btf, init_task, tasklist_lock) = match files {
            KernelFiles::Files {
                system_map,
                vmlinux,
            } => {
                let syms = Symbols::from_file(system_map).map_err(|e| e.to_string())?;
                let loc = kernel::locate(mem, cr3, cr4, &syms).map_err(|e| e.to_string())?;
                let bytes = std::fs::read(vmlinux)
                    .map_err(|e| format!("cannot read {}: {e}", vmlinux.display()))?;
                let btf = Btf::from_elf(&bytes).map_err(|e| e.to_string())?;
                let sym = |n: &str| {
                    syms.get(n)
                        .map(|a| a + loc.slide)
                        .ok_or(format!("System.map has no {n}"))
                };
                let (init_task, lock) = (sym("init_task")?, sym("tasklist_lock")?);
                (loc, btf, init_task, lock)
            }
            KernelFiles::SensorBox { gpa, size } => {
                let sb = sensorbox::read(mem, gpa, size, 1000).map_err(|e| {
                    format!("{e}\n(for a stock guest give its System.map and vmlinux)")
                })?;
                let st = sb
                    .state
                    .ok_or("the Sensor Box has no externalized-state descriptor")?;
                let loc = kernel::from_descriptor(mem, &st, cr3).map_err(|e| e.to_string())?;
                if st.btf_size == 0 || st.btf_size > MAX_GUEST_BTF {
                    return Err(format!(
                        "guest BTF size {} is implausible; give the guest's vmlinux",
                        st.btf_size
                    ));
                }
                let mut blob = vec![0u8; st.btf_size as usize];
                mem.read(loc.image_phys(st.btf_start), &mut blob)
                    .map_err(|e| e.to_string())?;
                let btf = Btf::parse(&blob).map_err(|e| e.to_string())?;
                (loc, btf, st.init_task, st.tasklist_lock)
            }
        };
        let layout = TaskLayout::from_btf(&btf).map_err(|e| e.to_string())?;
        let tasklist_lock = TasklistLock::new(&btf, tasklist_lock).map_err(|e| e.to_string())?;
        Ok(Target {
            loc,
            btf,
            layout,
            init_task,
            tasklist_lock,
        })
    }

    /// Walks the task list now. The caller holds the guest paused.
    pub fn walk(&self, mem: &dyn PhysMem) -> Result<Vec<Process>, String> {
        let km = KernelMem::new(mem, self.loc.clone());
        tasks::process_table(&km, &self.layout, self.init_task, Limits::default())
            .map_err(|e| e.to_string())
    }

    /// True if a fork or exit holds `tasklist_lock` for writing right now.
    pub fn tasklist_busy(&self, mem: &dyn PhysMem) -> Result<bool, String> {
        let km = KernelMem::new(mem, self.loc.clone());
        self.tasklist_lock
            .write_held(&km)
            .map_err(|e| e.to_string())
    }

    /// Pauses the guest at a moment when `tasklist_lock` is free (or, after `timeout`, anyway),
    /// walks the task list and resumes.
    pub fn process_table(
        &self,
        mem: &dyn PhysMem,
        pauser: &mut dyn Pauser,
        timeout: std::time::Duration,
    ) -> Result<Locked<Vec<Process>>, String> {
        consistency::read_quiescent(
            pauser,
            timeout,
            || self.tasklist_busy(mem),
            || self.walk(mem),
        )
    }
}
