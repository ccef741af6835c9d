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

use bdvmm_api::{map_memory, ApiClient, ApiError};
use introspect::mem::{MappedMem, MemError, PhysMem};

use crate::wire::{Regs, VmStatus, VM_PAUSED, VM_RUNNING, VM_STOPPED};

/// The guest's RAM ranges and backdoor range, fixed when the bridge starts.
#[derive(Clone, Debug)]
pub struct Layout {
    /// `(gpa, size)` of each RAM range.
    pub ram: Vec<(u64, u64)>,
    /// `(gpa, size)` of the backdoor range.
    pub backdoor: (u64, u64),
}

/// Why the backend could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// bdvmm's control API cannot be reached.
    #[error("cannot reach bdvmm at {socket}: {source}")]
    Connect {
        /// The API socket.
        socket: String,
        /// Why.
        source: ApiError,
    },
    /// bdvmm refused or the connection failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The guest's memory.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// A memory dump file.
    #[error("{path}: {source}")]
    Dump {
        /// The file.
        path: String,
        /// Why.
        source: MemError,
    },
    /// The exit watch.
    #[error("cannot watch {socket}: {source}")]
    Watch {
        /// The API socket.
        socket: String,
        /// Why.
        source: std::io::Error,
    },
    /// What a memory dump cannot do.
    #[error("a memory dump {0}")]
    NotLive(&'static str),
}

/// A source of guest memory and the pause lock.
pub trait Backend: Send + Sync {
    /// The layout.
    fn layout(&self) -> &Layout;
    /// The memory (live for a VM).
    fn mem(&self) -> &MappedMem;
    /// Pauses every vCPU for at most `lease` (renewing if already paused by us); returns the
    /// nanoseconds until all acknowledged.
    fn pause(&self, lease: Duration) -> Result<u64, BackendError>;
    /// Resumes the vCPUs.
    fn resume(&self) -> Result<(), BackendError>;
    /// One vCPU's registers.
    fn regs(&self, vcpu: u8) -> Result<Regs, BackendError>;
    /// Whether the vCPUs run.
    fn status(&self) -> Result<VmStatus, BackendError>;
    /// Restarts the guest in place.
    fn restart(&self) -> Result<(), BackendError>;
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
    pub fn connect(socket: &Path) -> Result<VmBackend, BackendError> {
        let mut api = ApiClient::connect(socket).map_err(|source| BackendError::Connect {
            socket: socket.display().to_string(),
            source,
        })?;
        let (file, map) = api.memory()?;
        let mem = map_memory(file, &map)?;
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

    /// The VM's engine as bdvmm reports it (`kvm`, `tcg`), if it answers.
    pub fn engine(&self) -> Option<String> {
        self.api().status().ok().map(|s| s.engine)
    }

    /// Blocks until bdvmm goes away (its API socket closes), on a connection of its own.
    pub fn watch_exit(&self) -> Result<(), BackendError> {
        let mut s = UnixStream::connect(&self.socket).map_err(|source| BackendError::Watch {
            socket: self.socket.display().to_string(),
            source,
        })?;
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
    fn restart(&self) -> Result<(), BackendError> {
        Ok(self.api().reset()?)
    }
    fn status(&self) -> Result<VmStatus, BackendError> {
        let st = self.api().status()?;
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
    fn pause(&self, lease: Duration) -> Result<u64, BackendError> {
        let r = self.api().pause(Some(lease))?;
        Ok(r.pause_ns)
    }
    fn resume(&self) -> Result<(), BackendError> {
        self.api().resume()?;
        Ok(())
    }
    fn regs(&self, vcpu: u8) -> Result<Regs, BackendError> {
        Ok(self.api().regs(vcpu)?)
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
    pub fn open(path: &Path, backdoor: (u64, u64)) -> Result<DumpBackend, BackendError> {
        let mem = MappedMem::open_dump(path).map_err(|source| BackendError::Dump {
            path: path.display().to_string(),
            source,
        })?;
        let ram = mem.ranges().iter().map(|r| (r.gpa, r.size)).collect();
        Ok(DumpBackend {
            mem,
            layout: Layout { ram, backdoor },
        })
    }

    /// Opens `path` read-write and shared: granted WRITEs (and one-sided RDMA writes) change the
    /// file. For tests on a scratch copy of a dump (`serve --dump-writable`), e.g. the SoftRoCE
    /// test's write to the hooks.
    pub fn open_writable(path: &Path, backdoor: (u64, u64)) -> Result<DumpBackend, BackendError> {
        let dump = |source| BackendError::Dump {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| dump(MemError::Io(format!("{}: {e}", path.display()))))?;
        let len = file
            .metadata()
            .map_err(|e| dump(MemError::Io(e.to_string())))?
            .len();
        let ranges = vec![introspect::mem::Range {
            gpa: 0,
            size: len,
            offset: 0,
        }];
        let mem = MappedMem::new(file, len, ranges, true).map_err(dump)?;
        Ok(DumpBackend {
            mem,
            layout: Layout {
                ram: vec![(0, len)],
                backdoor,
            },
        })
    }
}

impl Backend for DumpBackend {
    fn restart(&self) -> Result<(), BackendError> {
        Err(BackendError::NotLive("cannot be restarted"))
    }
    fn status(&self) -> Result<VmStatus, BackendError> {
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
    fn pause(&self, _lease: Duration) -> Result<u64, BackendError> {
        Ok(0)
    }
    fn resume(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn regs(&self, _vcpu: u8) -> Result<Regs, BackendError> {
        Err(BackendError::NotLive("has no vCPUs"))
    }
}

/// Reads through the backend's memory, as [`PhysMem`].
pub fn read(b: &dyn Backend, gpa: u64, len: usize) -> Result<Vec<u8>, BackendError> {
    let mut buf = vec![0u8; len];
    b.mem().read(gpa, &mut buf)?;
    Ok(buf)
}
