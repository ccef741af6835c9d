//! Where the bridge gets guest memory and the pause lock: a running bdvmm (its control API hands
//! over the memfd and the lease-based pause), or a memory dump file (read-only, nothing to pause).
//!
//! The bridge is its own process. If it crashes, its API connection closes and bdvmm ends any pause
//! lease it held, so the guest runs on; if the VM exits, the API socket closes and
//! [`VmBackend::watch_exit`] tells the bridge to stop.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use bdvmm::api::ApiClient;
use introspect::mem::{MappedMem, PhysMem};

use crate::wire::{Regs, VmStatus, VM_PAUSED, VM_RUNNING, VM_STOPPED};

/// The guest's RAM ranges and backdoor range, fixed when the bridge starts.
#[derive(Clone, Debug)]
pub struct Layout {
    /// `(gpa, size)` of each RAM range.
    pub ram: Vec<(u64, u64)>,
    /// `(gpa, size)` of the backdoor range.
    pub backdoor: (u64, u64),
}

/// A source of guest memory and the pause lock.
pub trait Backend: Send + Sync {
    /// The layout.
    fn layout(&self) -> &Layout;
    /// The memory (live for a VM).
    fn mem(&self) -> &MappedMem;
    /// Pauses every vCPU for at most `lease` (renewing if already paused by us); returns the
    /// nanoseconds until all acknowledged.
    fn pause(&self, lease: Duration) -> Result<u64, String>;
    /// Resumes the vCPUs.
    fn resume(&self) -> Result<(), String>;
    /// One vCPU's registers.
    fn regs(&self, vcpu: u8) -> Result<Regs, String>;
    /// Whether the vCPUs run.
    fn status(&self) -> Result<VmStatus, String>;
    /// Restarts the guest in place.
    fn restart(&self) -> Result<(), String>;
}

/// A running bdvmm guest.
pub struct VmBackend {
    api: Mutex<ApiClient>,
    socket: PathBuf,
    mem: MappedMem,
    layout: Layout,
}

impl VmBackend {
    /// Connects to bdvmm's control API and maps the guest's memory.
    pub fn connect(socket: &Path) -> Result<VmBackend, String> {
        let mut api = ApiClient::connect(socket)
            .map_err(|e| format!("cannot reach bdvmm at {}: {e}", socket.display()))?;
        let (file, map) = api.memory().map_err(|e| e.to_string())?;
        let mem = bdvmm::inspect::map_memory(file, &map)?;
        let layout = Layout {
            ram: map.ranges.iter().map(|r| (r.gpa, r.size)).collect(),
            backdoor: (map.backdoor.gpa, map.backdoor.size),
        };
        Ok(VmBackend {
            api: Mutex::new(api),
            socket: socket.to_owned(),
            mem,
            layout,
        })
    }

    fn api(&self) -> std::sync::MutexGuard<'_, ApiClient> {
        match self.api.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Blocks until bdvmm goes away (its API socket closes), on a connection of its own.
    pub fn watch_exit(&self) -> Result<(), String> {
        let mut s = UnixStream::connect(&self.socket)
            .map_err(|e| format!("cannot watch {}: {e}", self.socket.display()))?;
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return Ok(()),
            }
        }
    }
}

impl Backend for VmBackend {
    fn restart(&self) -> Result<(), String> {
        self.api().reset().map_err(|e| e.to_string())
    }
    fn status(&self) -> Result<VmStatus, String> {
        let st = self.api().status().map_err(|e| e.to_string())?;
        Ok(VmStatus {
            state: match st.state.as_str() {
                "running" => VM_RUNNING,
                "paused" => VM_PAUSED,
                _ => VM_STOPPED,
            },
            vcpus: st.vcpus,
            uptime_ms: st.uptime_ms,
            pauses: st.pauses,
        })
    }
    fn layout(&self) -> &Layout {
        &self.layout
    }
    fn mem(&self) -> &MappedMem {
        &self.mem
    }
    fn pause(&self, lease: Duration) -> Result<u64, String> {
        let r = self.api().pause(Some(lease)).map_err(|e| e.to_string())?;
        Ok(r.pause_ns)
    }
    fn resume(&self) -> Result<(), String> {
        self.api().resume().map(|_| ()).map_err(|e| e.to_string())
    }
    fn regs(&self, vcpu: u8) -> Result<Regs, String> {
        let r = self.api().regs(vcpu).map_err(|e| e.to_string())?;
        Ok(Regs {
            rip: r.rip,
            rsp: r.rsp,
            rflags: r.rflags,
            cr0: r.cr0,
            cr2: r.cr2,
            cr3: r.cr3,
            cr4: r.cr4,
            efer: r.efer,
            fs_base: r.fs_base,
            gs_base: r.gs_base,
            kernel_gs_base: r.kernel_gs_base,
            cpl: r.cpl,
        })
    }
}

/// A raw memory dump (guest-physical address = file offset), served read-only: for looking at a
/// saved guest after the fact. Pausing is a no-op; there are no vCPUs.
pub struct DumpBackend {
    mem: MappedMem,
    layout: Layout,
}

impl DumpBackend {
    /// Opens `path`; `backdoor` is where the backdoor range was in the dumped guest.
    pub fn open(path: &Path, backdoor: (u64, u64)) -> Result<DumpBackend, String> {
        let mem = MappedMem::open_dump(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let ram = mem.ranges().iter().map(|r| (r.gpa, r.size)).collect();
        Ok(DumpBackend {
            mem,
            layout: Layout { ram, backdoor },
        })
    }
}

impl Backend for DumpBackend {
    fn restart(&self) -> Result<(), String> {
        Err("a memory dump cannot be restarted".into())
    }
    fn status(&self) -> Result<VmStatus, String> {
        Ok(VmStatus {
            state: VM_STOPPED,
            vcpus: 0,
            uptime_ms: 0,
            pauses: 0,
        })
    }
    fn layout(&self) -> &Layout {
        &self.layout
    }
    fn mem(&self) -> &MappedMem {
        &self.mem
    }
    fn pause(&self, _lease: Duration) -> Result<u64, String> {
        Ok(0)
    }
    fn resume(&self) -> Result<(), String> {
        Ok(())
    }
    fn regs(&self, _vcpu: u8) -> Result<Regs, String> {
        Err("a memory dump has no vCPUs".into())
    }
}

/// Reads through the backend's memory, as [`PhysMem`].
pub fn read(b: &dyn Backend, gpa: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    b.mem().read(gpa, &mut buf).map_err(|e| e.to_string())?;
    Ok(buf)
}
