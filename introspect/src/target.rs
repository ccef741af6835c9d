//! Everything a reader needs to walk a guest's task list, found once per boot: where the kernel
//! is, its BTF, `init_task` and `tasklist_lock`.
//!
//! A patched guest describes itself in the Sensor Box's externalized-state descriptor, so nothing
//! but guest memory and CR3 is needed; a stock guest needs its `System.map` and its `vmlinux` (for
//! BTF). The kernel's location and layouts do not change while it runs, so callers find the
//! [`Target`] once and reuse it for every walk.
//!
//! **First, do no harm.** Only the guest-memory reads that need a consistent guest happen under
//! the pause. A stock kernel's files are read, parsed and checked before it ([`StockKernel::load`],
//! which a monitor does once and keeps, [`KernelFiles::Stock`]), so a wrong path or a file that is
//! not the guest's vmlinux fails without ever stopping the guest; a patched guest's BTF blob
//! (read-only data) is copied and parsed after it.

use std::path::Path;

use crate::btf::{Btf, BtfError};
use crate::consistency::{self, Locked, Pausable};
use crate::cpus::{CpuCount, RqLayout, Runqueues, Unavailable};
use crate::kernel::{self, KernelError, KernelLocation, Symbols};
use crate::mem::{MemError, PhysMem};
use crate::sensorbox::{self, ExternalState, SbError};
use crate::tasks::{self, KernelMem, Limits, Process, TaskError, TaskLayout, TasklistLock};

/// Pauses [`Target::locate_paused`] tries when each one catches a Sensor Box update half done.
pub const LOCATE_ATTEMPTS: u32 = 5;
/// How long the guest runs between them.
pub const LOCATE_BACKOFF: std::time::Duration = std::time::Duration::from_millis(2);

/// Pauses [`StockKernel::discover_paused`] takes at most, each for a fresh CR3.
pub const DISCOVER_ATTEMPTS: u32 = 3;

/// Largest BTF blob copied out of a guest.
pub const MAX_GUEST_BTF: u64 = 64 << 20;

/// Largest `vmlinux` read (a distribution kernel's is about 60 MB; one with full DWARF a few
/// hundred): a path to some huge file is refused rather than read into memory.
pub const MAX_VMLINUX: u64 = 1 << 30;

/// Symbols [`kernel::locate`] and the walk need from a stock kernel's System.map.
const STOCK_SYMBOLS: [&str; 5] = [
    "linux_banner",
    "_text",
    "phys_base",
    "init_task",
    "tasklist_lock",
];

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
    /// A stock guest: its System.map and vmlinux (for BTF), read and parsed (before any pause) at
    /// each locate. A caller that locates more than once should load a [`StockKernel`] once and
    /// pass [`KernelFiles::Stock`].
    Files {
        /// `System.map` of the guest's kernel.
        system_map: &'a Path,
        /// The guest's `vmlinux` (only its `.BTF` section is used).
        vmlinux: &'a Path,
    },
    /// A stock guest whose files are already loaded (or whose kernel was found in its memory
    /// before, [`StockKernel::discover_paused`]).
    Stock(&'a StockKernel),
    /// A stock guest with no files: its symbols and types are found in its own memory
    /// ([`crate::discover`]).
    Memory,
    /// No files: the patched guest's Sensor Box if the backdoor range `[gpa, gpa + size)` holds
    /// one, otherwise the kernel's own memory.
    Auto {
        /// Guest-physical start of the backdoor range.
        gpa: u64,
        /// Its size.
        size: u64,
    },
}

impl KernelFiles<'_> {
    /// What `Auto` comes to for this guest now: a Sensor Box there (or one being written: torn)
    /// means a patched guest; none, the kernel's own memory.
    pub fn resolve(self, mem: &dyn PhysMem) -> Self {
        match self {
            KernelFiles::Auto { gpa, size } => match sensorbox::read(mem, gpa, size, 1000) {
                Err(SbError::BadMagic(_)) | Err(SbError::Mem(_)) => KernelFiles::Memory,
                _ if size == 0 => KernelFiles::Memory,
                _ => KernelFiles::SensorBox { gpa, size },
            },
            other => other,
        }
    }
}

/// Why the guest kernel could not be located.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// System.map, or the kernel's place in memory.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The vmlinux file.
    #[error("cannot read vmlinux {path}: {source}")]
    Vmlinux {
        /// Its path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The vmlinux file has no usable BTF (not a vmlinux, a compressed vmlinuz, a kernel built
    /// without `CONFIG_DEBUG_INFO_BTF`).
    #[error("vmlinux {path}: {source}")]
    VmlinuxBtf {
        /// Its path.
        path: String,
        /// Why.
        source: BtfError,
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
    /// Finding the kernel's symbols and types in its memory.
    #[error(transparent)]
    Discover(#[from] crate::discover::DiscoverError),
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
    /// The kernel release (`uname -r`, from `linux_banner`), for messages.
    pub release: String,
    /// Each CPU's runqueue, or why it cannot be read (a patched kernel without patch 0007, or
    /// a layout introspect does not know).
    pub cpus: Result<Runqueues, Unavailable>,
}

/// A stock kernel's `System.map` and `vmlinux`, read, parsed and checked: everything locating it
/// needs that does not come from guest memory. Loading takes the time (a distribution vmlinux is
/// about 60 MB); it needs no guest, so it is done before any pause, and a monitor keeps it for as
/// long as the files do not change.
#[derive(Clone, Debug)]
pub struct StockKernel {
    syms: Symbols,
    btf: Btf,
    /// `init_task` at link time (before the KASLR slide).
    init_task: u64,
    /// `tasklist_lock` at link time.
    tasklist_lock: u64,
    /// Found in guest memory rather than loaded from files.
    from_memory: bool,
    /// The release, when known before locating (found in memory).
    release: Option<String>,
}

impl StockKernel {
    /// Checks symbols and types that came from files or from guest memory.
    fn new(
        syms: Symbols,
        btf: Btf,
        from_memory: bool,
        release: &str,
    ) -> Result<StockKernel, TargetError> {
        let sym = |n: &'static str| syms.get(n).ok_or(TargetError::NoSymbol(n));
        for n in STOCK_SYMBOLS {
            sym(n)?;
        }
        let (init_task, tasklist_lock) = (sym("init_task")?, sym("tasklist_lock")?);
        // The kernel's structs must make sense now, not after a pause.
        TaskLayout::from_btf_for(&btf, release)?;
        TasklistLock::new(&btf, tasklist_lock)?;
        Ok(StockKernel {
            syms,
            btf,
            init_task,
            tasklist_lock,
            from_memory,
            release: from_memory.then(|| release.to_string()),
        })
    }

    /// Finds the kernel's symbols and types in guest memory from `cr3`/`cr4` (no files), and
    /// where it sits. Needs no pause: everything it reads is constant while the kernel runs.
    pub fn discover(
        mem: &dyn PhysMem,
        cr3: u64,
        cr4: u64,
    ) -> Result<(StockKernel, KernelLocation), TargetError> {
        let found = crate::discover::discover(mem, cr3, cr4)?;
        let banner = found.symbols.get("linux_banner").unwrap_or(0);
        let km = KernelMem::new(mem, found.loc.clone());
        let release = crate::banner::release(&km, banner.wrapping_add(found.loc.slide))
            .unwrap_or_else(|| "(unknown release)".into());
        let kernel = StockKernel::new(found.symbols, found.btf, true, &release)?;
        Ok((kernel, found.loc))
    }

    /// Pauses the guest with `pauser` only to read CR3 and CR4 with `regs`, resumes it, then
    /// [`StockKernel::discover`]s with the guest running.
    pub fn discover_paused<P, E>(
        mem: &dyn PhysMem,
        pauser: &mut P,
        mut regs: impl FnMut(&mut P) -> Result<(u64, u64), E>,
    ) -> Result<(StockKernel, KernelLocation), E>
    where
        P: Pausable,
        E: From<P::Error> + From<TargetError>,
    {
        // CR3 is the page table of whatever process ran; if it exits while the tables are read
        // (with the guest running), the walk fails: pause again for a fresh CR3, a few times.
        let mut attempt = 1;
        loop {
            let mut paused = pauser.paused()?;
            let (cr3, cr4) = regs(&mut paused)?;
            paused.resume()?;
            match StockKernel::discover(mem, cr3, cr4) {
                Err(TargetError::Discover(e))
                    if attempt < DISCOVER_ATTEMPTS && e.is_transient() =>
                {
                    attempt += 1;
                }
                r => return Ok(r?),
            }
        }
    }

    /// The kernel release read from guest memory (kernels found there; `None` for files).
    pub fn release(&self) -> Option<&str> {
        self.release.as_deref()
    }

    /// True if this kernel was found in guest memory, not loaded from files.
    pub fn from_memory(&self) -> bool {
        self.from_memory
    }

    /// Reads and checks both files: the symbols the walk needs, the vmlinux's `.BTF` section and
    /// the task layouts it must describe.
    pub fn load(system_map: &Path, vmlinux: &Path) -> Result<StockKernel, TargetError> {
        let syms = Symbols::from_file(system_map)?;
        for n in STOCK_SYMBOLS {
            syms.get(n).ok_or(TargetError::NoSymbol(n))?;
        }
        let path = || vmlinux.display().to_string();
        let io = |source| TargetError::Vmlinux {
            path: path(),
            source,
        };
        let len = std::fs::metadata(vmlinux).map_err(io)?.len();
        if len > MAX_VMLINUX {
            return Err(io(std::io::Error::other(format!(
                "{len} bytes is too large for a vmlinux (limit {MAX_VMLINUX})"
            ))));
        }
        let bytes = std::fs::read(vmlinux).map_err(io)?;
        let btf = Btf::from_elf(&bytes).map_err(|source| TargetError::VmlinuxBtf {
            path: path(),
            source,
        })?;
        StockKernel::new(syms, btf, false, "(the vmlinux given)")
    }

    /// Its symbols.
    pub fn symbols(&self) -> &Symbols {
        &self.syms
    }

    /// Its types.
    pub fn btf(&self) -> &Btf {
        &self.btf
    }
}

/// Where a locate gets what does not come from guest memory.
#[derive(Clone, Copy)]
enum Source<'a> {
    SensorBox { gpa: u64, size: u64 },
    Stock(&'a StockKernel),
}

/// What the reads under the pause found; [`Found::finish`] makes it a [`Target`] afterwards.
enum Found<'a> {
    Stock {
        loc: KernelLocation,
        kernel: &'a StockKernel,
    },
    Patched {
        loc: KernelLocation,
        st: ExternalState,
        len: usize,
    },
}

/// Bytes of a guest's BTF blob read at a time (it is copied with the guest running: a bridge
/// session reads through without its page cache then, one READ per chunk).
const BTF_CHUNK: usize = 1 << 20;

/// Loads `files` (when they are paths) before calling `f`: nothing is read from disk inside it.
fn with_source<T, E: From<TargetError>>(
    files: KernelFiles<'_>,
    f: impl FnOnce(Source<'_>) -> Result<T, E>,
) -> Result<T, E> {
    match files {
        KernelFiles::Files {
            system_map,
            vmlinux,
        } => f(Source::Stock(&StockKernel::load(system_map, vmlinux)?)),
        KernelFiles::Stock(k) => f(Source::Stock(k)),
        KernelFiles::SensorBox { gpa, size } => f(Source::SensorBox { gpa, size }),
        // Callers resolve these first ([`KernelFiles::resolve`], [`StockKernel::discover`]).
        KernelFiles::Memory | KernelFiles::Auto { .. } => {
            Err(TargetError::NoSymbol("(no kernel discovered)").into())
        }
    }
}

/// The guest-memory reads of a locate: the ones that need the guest paused.
fn read<'a>(
    mem: &dyn PhysMem,
    cr3: u64,
    cr4: u64,
    src: Source<'a>,
) -> Result<Found<'a>, TargetError> {
    match src {
        Source::Stock(kernel) => Ok(Found::Stock {
            loc: kernel::locate(mem, cr3, cr4, &kernel.syms)?,
            kernel,
        }),
        Source::SensorBox { gpa, size } => {
            let sb = sensorbox::read(mem, gpa, size, 1000)?;
            let st = sb.state.ok_or(TargetError::NoDescriptor)?;
            let loc = kernel::from_descriptor(mem, &st, cr3)?;
            let len = usize::try_from(st.btf_size)
                .ok()
                .filter(|&n| n != 0 && st.btf_size <= MAX_GUEST_BTF)
                .ok_or(TargetError::ImplausibleBtf(st.btf_size))?;
            Ok(Found::Patched { loc, st, len })
        }
    }
}

impl Found<'_> {
    /// Copies and parses the kernel's types, with the guest running again: its `.BTF` section is
    /// read-only data that does not change while the kernel runs, so it needs no pause.
    fn finish(self, mem: &dyn PhysMem) -> Result<Target, TargetError> {
        let (loc, btf, init_task, tasklist_lock, banner, rq) = match self {
            Found::Stock { loc, kernel } => {
                let slid = |a: u64| a.wrapping_add(loc.slide);
                let (init, lock) = (slid(kernel.init_task), slid(kernel.tasklist_lock));
                let banner = kernel.syms.get("linux_banner").map_or(0, slid);
                let sym = |n: &'static str| kernel.syms.get(n).ok_or(Unavailable::NoSymbol(n));
                // Per-CPU symbols are offsets into each CPU's area and are not slid.
                let rq = (|| {
                    Ok((
                        sym("runqueues")?,
                        slid(sym("__per_cpu_offset")?),
                        CpuCount::At(slid(sym("nr_cpu_ids")?)),
                    ))
                })();
                (loc, kernel.btf.clone(), init, lock, banner, rq)
            }
            Found::Patched { loc, st, len } => {
                let mut blob = vec![0u8; len];
                let start = loc.image_phys(st.btf_start);
                for (at, chunk) in (0u64..).step_by(BTF_CHUNK).zip(blob.chunks_mut(BTF_CHUNK)) {
                    mem.read(start.wrapping_add(at), chunk)?;
                }
                let banner = st.linux_banner;
                let rq = st
                    .runqueues
                    .map(|rq| (rq, st.per_cpu_offset, CpuCount::Value(st.nr_cpu_ids)))
                    .ok_or(Unavailable::NotNamed);
                (
                    loc,
                    Btf::parse(&blob)?,
                    st.init_task,
                    st.tasklist_lock,
                    banner,
                    rq,
                )
            }
        };
        let cpus = rq.and_then(|(runqueues, per_cpu_offset, cpus)| {
            let layout = RqLayout::from_btf(&btf).map_err(Unavailable::Layout)?;
            Ok(Runqueues {
                runqueues,
                per_cpu_offset,
                cpus,
                layout,
            })
        });
        let release = crate::banner::release(&KernelMem::new(mem, loc.clone()), banner)
            .unwrap_or_else(|| "(unknown release)".into());
        let layout = TaskLayout::from_btf_for(&btf, &release)?;
        let tasklist_lock = TasklistLock::new(&btf, tasklist_lock)?;
        Ok(Target {
            loc,
            btf,
            layout,
            init_task,
            tasklist_lock,
            release,
            cpus,
        })
    }
}

impl Target {
    /// The target of a stock kernel already found at `loc` (by [`StockKernel::discover`]).
    pub fn with_stock(
        mem: &dyn PhysMem,
        kernel: &StockKernel,
        loc: KernelLocation,
    ) -> Result<Target, TargetError> {
        Found::Stock { loc, kernel }.finish(mem)
    }

    /// Locates the kernel from `cr3`/`cr4` (read with the guest paused) and `files`. The caller
    /// holds the guest paused for the whole call; [`Target::locate_paused`] pauses for the memory
    /// reads only.
    pub fn locate(
        mem: &dyn PhysMem,
        cr3: u64,
        cr4: u64,
        files: KernelFiles<'_>,
    ) -> Result<Target, TargetError> {
        if let KernelFiles::Memory = files.resolve(mem) {
            let (kernel, loc) = StockKernel::discover(mem, cr3, cr4)?;
            return Target::with_stock(mem, &kernel, loc);
        }
        with_source(files.resolve(mem), |src| {
            read(mem, cr3, cr4, src)?.finish(mem)
        })
    }

    /// Loads the kernel files (if `files` are paths) with the guest running, then pauses it with
    /// `pauser`, reads CR3 and CR4 with `regs`, makes the memory reads that locate the kernel,
    /// resumes, and only then parses what it read. A pause can catch the guest kernel in the
    /// middle of publishing its Sensor Box (the sequence counter odd), and then no read succeeds
    /// until it runs again: the guest runs [`LOCATE_BACKOFF`] and is paused again, at most
    /// [`LOCATE_ATTEMPTS`] times. Files that cannot be read or parsed fail before any pause.
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
        let files = files.resolve(mem);
        if let KernelFiles::Memory = files {
            let (kernel, loc) = StockKernel::discover_paused(mem, pauser, regs)?;
            return Ok(Target::with_stock(mem, &kernel, loc)?);
        }
        with_source(files, |src| {
            let mut attempt = 1;
            loop {
                let mut paused = pauser.paused()?;
                let (cr3, cr4) = regs(&mut paused)?;
                // A stock kernel's place is found from its page tables and image, which do not
                // change while it runs: only the registers need the pause.
                // If the process whose page table CR3 is exits meanwhile, the search fails: try
                // again with a fresh CR3, as many times as for a torn Sensor Box.
                if let Source::Stock(_) = src {
                    paused.resume()?;
                    match read(mem, cr3, cr4, src) {
                        Ok(found) => return Ok(found.finish(mem)?),
                        Err(TargetError::Kernel(_)) if attempt < LOCATE_ATTEMPTS => {
                            attempt += 1;
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                match read(mem, cr3, cr4, src) {
                    Ok(found) => {
                        paused.resume()?;
                        return Ok(found.finish(mem)?);
                    }
                    Err(TargetError::SensorBox(SbError::Torn(_))) if attempt < LOCATE_ATTEMPTS => {
                        paused.resume()?;
                        attempt += 1;
                        std::thread::sleep(LOCATE_BACKOFF);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        })
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
        self.process_table_within(mem, pauser, timeout, Limits::default())
    }

    /// [`Target::process_table`] with the walk bounded by `limits` instead of the defaults (a
    /// slow link or a nested guest may need more than the default time for a large table).
    pub fn process_table_within<P: Pausable, E: From<P::Error> + From<TaskError>>(
        &self,
        mem: &dyn PhysMem,
        pauser: &mut P,
        timeout: std::time::Duration,
        limits: Limits,
    ) -> Result<Locked<Vec<Process>>, E> {
        consistency::read_quiescent(
            pauser,
            timeout,
            || Ok(self.tasklist_busy(mem)?),
            || Ok(self.walk_within(mem, limits)?),
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

    /// A stock guest misconfigured as a new user would: a typo in the vmlinux path, a vmlinuz
    /// or some other file given as vmlinux, a missing System.map. Each is found before the guest
    /// is paused even once (it used to be paused first, and the files parsed while it waited).
    #[test]
    fn files_that_cannot_be_read_or_parsed_fail_before_any_pause() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("System.map");
        let text: String = STOCK_SYMBOLS
            .iter()
            .zip(1u64..)
            .map(|(n, i)| format!("ffffffff8{i:07x} D {n}\n"))
            .collect();
        std::fs::write(&map, text).unwrap();
        let not_elf = dir.path().join("vmlinuz");
        std::fs::write(&not_elf, b"MZ\x00this is a bzImage, not a vmlinux").unwrap();
        let missing = dir.path().join("vmlinux-typo");
        let mem = VecMem::new(0, vec![0u8; 4096]);
        for (system_map, vmlinux, want) in [
            (&map, &missing, "cannot read vmlinux"),
            (&map, &not_elf, "not an ELF file"),
            (&missing, &not_elf, "cannot read System.map"),
        ] {
            let mut g = Guest::default();
            let r: Result<Target, TestError> = Target::locate_paused(
                &mem,
                &mut g,
                |_| Ok((0, 0)),
                KernelFiles::Files {
                    system_map,
                    vmlinux,
                },
            );
            let e = r.err().expect("locating with bad files fails").to_string();
            assert!(e.contains(want), "{e}");
            assert_eq!(g.pauses, 0, "paused for {e}");
        }
        // The paths are named, so the user knows which setting to fix.
        let e = StockKernel::load(&map, &missing).unwrap_err().to_string();
        assert!(e.contains("vmlinux-typo"), "{e}");
    }
}
