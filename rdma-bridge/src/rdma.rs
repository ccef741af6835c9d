//! The server's side of the verbs data path (feature `verbs`): which memory regions each monitor
//! gets, and the RDMA_CONNECT exchange. The verbs themselves are in [`crate::verbs`].
//!
//! At start, every monitor's grants are registered as memory regions of their own, directly on the
//! mapping of bdvmm's memfd: read grants with remote-read access only; write grants with
//! remote-write access only, and **only when `agreement.k` is 1** — a one-sided RDMA write cannot
//! wait for other monitors, so with k-of-n agreement writes go through the control channel's WRITE,
//! where the Guard counts the votes. A monitor's RDMA_CONNECT returns just its own regions.
//!
//! Limit: all regions live in one protection domain, so the NIC tells monitors apart only by the
//! rkeys each was given; a monitor that guessed another's rkey could use its regions. A protection
//! domain per monitor would close that; it is not done yet.

use std::collections::HashMap;
use std::sync::Mutex;

use introspect::mem::MemError;

use crate::backend::Backend;
use crate::guard::Grants;
use crate::verbs::{self, Access, RegionInfo, RegionSpec, VerbsError, VerbsTarget};

/// Why the verbs data path could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// The device, a registration or the exchange.
    #[error("RDMA: {0}")]
    Verbs(#[from] VerbsError),
    /// A monitor's grant is not in guest memory.
    #[error("RDMA: monitor {monitor}: {source}")]
    Region {
        /// The monitor.
        monitor: String,
        /// Why.
        source: MemError,
    },
}

/// Registered regions and the target's queue pairs.
pub struct RdmaGlue {
    target: Mutex<VerbsTarget>,
    regions: HashMap<String, Vec<RegionInfo>>,
}

impl RdmaGlue {
    /// Opens `device` and registers every monitor's grants.
    pub fn new(
        device: Option<&str>,
        backend: &dyn Backend,
        grants: &Grants,
        k: usize,
    ) -> Result<RdmaGlue, RdmaError> {
        let mut target = VerbsTarget::open(device)?;
        let mut specs = Vec::new();
        let mut owner = Vec::new();
        for (name, grant) in grants.iter() {
            let writes: &[(u64, u64)] = if k == 1 { &grant.write } else { &[] };
            let ranges = grant
                .read
                .iter()
                .map(|r| (r, Access::RemoteRead))
                .chain(writes.iter().map(|r| (r, Access::RemoteWrite)));
            for (i, (&(gpa, len), access)) in ranges.enumerate() {
                let region = |source| RdmaError::Region {
                    monitor: name.clone(),
                    source,
                };
                let len_us =
                    usize::try_from(len).map_err(|_| region(MemError::OutOfRange { gpa, len }))?;
                let host = backend.mem().host_ptr(gpa, len_us).map_err(region)?;
                specs.push(RegionSpec {
                    name: format!("{}-{i}", &name[..name.len().min(24)]),
                    gpa,
                    host,
                    len: len_us,
                    access,
                });
                owner.push(name.clone());
            }
        }
        // SAFETY: every host pointer is inside bdvmm's memfd mapping held by `backend`, which the
        // server keeps alive as long as this glue (both live in the server's shared state); no Rust
        // references into guest memory exist (it is only accessed by volatile copies).
        let infos = unsafe { target.register(specs) }?;
        let mut regions: HashMap<String, Vec<RegionInfo>> = HashMap::new();
        for (info, name) in infos.into_iter().zip(owner) {
            regions.entry(name).or_default().push(info);
        }
        Ok(RdmaGlue {
            target: Mutex::new(target),
            regions,
        })
    }

    /// Connects `monitor`'s queue pair; returns the bridge's blob with the monitor's regions.
    pub fn connect(&self, monitor: &str, blob: &[u8]) -> Result<Vec<u8>, VerbsError> {
        let (remote, _) = verbs::decode_connect(blob)?;
        let mine = self.regions.get(monitor).cloned().unwrap_or_default();
        let mut t = match self.target.lock() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        let local = t.accept(remote)?;
        verbs::encode_connect(&local, &mine)
    }
}
