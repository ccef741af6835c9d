//! Everything a reader needs to walk a guest's task list, found once per boot: where the kernel
//! is, its BTF, `init_task` and `tasklist_lock`.
//!
//! A patched guest describes itself in the Sensor Box's externalized-state descriptor, so nothing
//! but guest memory and CR3 is needed; a stock guest needs its `System.map` and its `vmlinux` (for
//! BTF). The kernel's location and layouts do not change while it runs, so callers find the
//! [`Target`] once, with the guest paused, and reuse it for every walk.

use std::path::Path;

use crate::btf::{Btf, BtfError};
use crate::consistency::{self, Locked, Pausable};
use crate::kernel::{self, KernelError, KernelLocation, Symbols};
use crate::mem::{MemError, PhysMem};
use crate::sensorbox::{self, SbError};
use crate::tasks::{self, KernelMem, Limits, Process, TaskError, TaskLayout, TasklistLock};

/// Pauses [`Target::locate_paused`] tries when each one catches a Sensor Box update half done.
pub const LOCATE_ATTEMPTS: u32 = 5;
/// How long the guest runs between them.
pub const LOCATE_BACKOFF: std::time::Duration = std::time::Duration::from_millis(2);

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

/// Why the guest kernel could not be located.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// System.map, or the kernel's place in memory.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The vmlinux file.
    #[error("cannot read {path}: {source}")]
    Vmlinux {
        /// Its path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A symbol the walk needs is not in System.map.
    #[error("System.map has no {0}")]
    NoSymbol(&'static str),
    /// The kernel's types.
    #[error(transparent)]
    Btf(#[from] BtfError),
    /// The patched guest's Sensor Box.
    #[error("{0}\n(for a stock guest give its System.map and vmlinux)")]
    SensorBox(#[from] SbError),
    /// A Sensor Box without the externalized-state descriptor.
    #[error("the Sensor Box has no externalized-state descriptor")]
    NoDescriptor,
    /// The guest claims a BTF size no kernel has.
    #[error("guest BTF size {0} is implausible; give the guest's vmlinux")]
    ImplausibleBtf(u64),
    /// Guest memory.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// Task layouts or `tasklist_lock`.
    #[error(transparent)]
    Task(#[from] TaskError),
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
    ) -> Result<Target, TargetError> {
        let (loc, btf, init_task, tasklist_lock) = match files {
            KernelFiles::Files {
                system_map,
                vmlinux,
            } => {
                let syms = Symbols::from_file(system_map)?;
                let loc = kernel::locate(mem, cr3, cr4, &syms)?;
                let bytes = std::fs::read(vmlinux).map_err(|source| TargetError::Vmlinux {
                    path: vmlinux.display().to_string(),
                    source,
                })?;
                let btf = Btf::from_elf(&bytes)?;
                let sym = |n: &'static str| {
                    syms.get(n)
                        .map(|a| a.wrapping_add(loc.slide))
                        .ok_or(TargetError::NoSymbol(n))
                };
                let (init_task, lock) = (sym("init_task")?, sym("tasklist_lock")?);
                (loc, btf, init_task, lock)
            }
            KernelFiles::SensorBox { gpa, size } => {
                let sb = sensorbox::read(mem, gpa, size, 1000)?;
                let st = sb.state.ok_or(TargetError::NoDescriptor)?;
                let loc = kernel::from_descriptor(mem, &st, cr3)?;
                let len = usize::try_from(st.btf_size)
                    .ok()
                    .filter(|&n| n != 0 && st.btf_size <= MAX_GUEST_BTF)
                    .ok_or(TargetError::ImplausibleBtf(st.btf_size))?;
                let mut blob = vec![0u8; len];
                mem.read(loc.image_phys(st.btf_start), &mut blob)?;
                let btf = Btf::parse(&blob)?;
                (loc, btf, st.init_task, st.tasklist_lock)
            }
        };
        let layout = TaskLayout::from_btf(&btf)?;
        let tasklist_lock = TasklistLock::new(&btf, tasklist_lock)?;
        Ok(Target {
            loc,
            btf,
            layout,
            init_task,
            tasklist_lock,
        })
    }

    /// Pauses the guest with `pauser`, reads CR3 and CR4 with `regs`, locates the kernel and
    /// resumes. A pause can catch the guest kernel in the middle of publishing its Sensor Box (the
    /// sequence counter odd), and then no read succeeds until it runs again: the guest runs
    /// [`LOCATE_BACKOFF`] and is paused again, at most [`LOCATE_ATTEMPTS`] times.
    pub fn locate_paused<P, E>(
        mem: &dyn PhysMem,
        pauser: &mut P,
        mut regs: impl FnMut(&mut P) -> Result<(u64, u64), E>,
        files: KernelFiles<'_>,
    ) -> Result<Target, E>
    where
        P: Pausable,
        E: From<P::Error> + From<TargetError>,
    {
        let mut attempt = 1;
        loop {
            let mut paused = pauser.paused()?;
            let (cr3, cr4) = regs(&mut paused)?;
            match Target::locate(mem, cr3, cr4, files) {
                Ok(found) => {
                    paused.resume()?;
                    return Ok(found);
                }
                Err(TargetError::SensorBox(SbError::Torn(_))) if attempt < LOCATE_ATTEMPTS => {
                    paused.resume()?;
                    attempt += 1;
                    std::thread::sleep(LOCATE_BACKOFF);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Walks the task list now, within the default [`Limits`]. The caller holds the guest paused.
    pub fn walk(&self, mem: &dyn PhysMem) -> Result<Vec<Process>, TaskError> {
        self.walk_within(mem, Limits::default())
    }

    /// Walks the task list now, within `limits`. The caller holds the guest paused.
    pub fn walk_within(
        &self,
        mem: &dyn PhysMem,
        limits: Limits,
    ) -> Result<Vec<Process>, TaskError> {
        let km = KernelMem::new(mem, self.loc.clone());
        tasks::process_table(&km, &self.layout, self.init_task, limits)
    }

    /// True if a fork or exit holds `tasklist_lock` for writing right now.
    pub fn tasklist_busy(&self, mem: &dyn PhysMem) -> Result<bool, TaskError> {
        let km = KernelMem::new(mem, self.loc.clone());
        self.tasklist_lock.write_held(&km)
    }

    /// Pauses the guest at a moment when `tasklist_lock` is free (or, after `timeout`, anyway),
    /// walks the task list and resumes.
    pub fn process_table<P: Pausable, E: From<P::Error> + From<TaskError>>(
        &self,
        mem: &dyn PhysMem,
        pauser: &mut P,
        timeout: std::time::Duration,
    ) -> Result<Locked<Vec<Process>>, E> {
        consistency::read_quiescent(
            pauser,
            timeout,
            || Ok(self.tasklist_busy(mem)?),
            || Ok(self.walk(mem)?),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::VecMem;

    #[derive(Default)]
    struct Guest {
        paused: bool,
        pauses: u32,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("fake")]
    struct Never;

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error(transparent)]
        Pause(#[from] Never),
        #[error(transparent)]
        Target(#[from] TargetError),
    }

    impl Pausable for Guest {
        type Error = Never;
        fn pause(&mut self) -> Result<(), Never> {
            self.paused = true;
            self.pauses += 1;
            Ok(())
        }
        fn resume(&mut self) -> Result<(), Never> {
            self.paused = false;
            Ok(())
        }
    }

    #[test]
    fn a_box_caught_mid_update_gets_a_bounded_number_of_fresh_pauses() {
        // An odd sequence counter: the guest kernel was paused in the middle of publishing.
        let image = sensorbox::encode(&[], 250, 43);
        let size = u64::try_from(image.len()).unwrap();
        let mem = VecMem::new(0x10_0000, image);
        let mut g = Guest::default();
        let r: Result<Target, TestError> = Target::locate_paused(
            &mem,
            &mut g,
            |g| {
                assert!(g.paused, "registers are read while paused");
                Ok((0, 0))
            },
            KernelFiles::SensorBox {
                gpa: 0x10_0000,
                size,
            },
        );
        assert!(
            matches!(
                r,
                Err(TestError::Target(TargetError::SensorBox(SbError::Torn(_))))
            ),
            "{:?}",
            r.err()
        );
        assert_eq!(g.pauses, LOCATE_ATTEMPTS);
        assert!(!g.paused, "the guest runs again after the last attempt");
    }
}
