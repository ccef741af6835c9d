//! `bdmon check` for a stock guest's optional `system_map` and `vmlinux`: they must parse (the
//! symbols the walk needs, a vmlinux with BTF, task layouts it describes) and, when the guest can
//! be reached, belong to the kernel it runs. Without them bdmon finds the kernel's symbols and
//! types in guest memory; wrong ones would override what is right, so a mismatch fails the check.
//!
//! Reaching the guest pauses it once, only to read CR3 (the kernel is then found with the guest
//! running). The comparison: the running kernel's `linux_banner` (version, compiler, build number
//! and date) must appear in the vmlinux, and System.map must place `_text`, `linux_banner`,
//! `init_task` and `tasklist_lock` where the kernel's own symbol table does.

use std::path::Path;
use std::time::Duration;

use bridge_client::client::{Bridge, BridgeMem, InspectError};
use introspect::target::{StockKernel, TargetError};
use introspect::tasks::{KernelMem, TaskError};

use crate::config::GuestConfig;

/// How long `bdmon check` tries to reach a guest's bridge.
const REACH: Duration = Duration::from_secs(3);
/// Symbols that must agree between System.map and the running kernel.
const COMPARED: [&str; 4] = ["_text", "linux_banner", "init_task", "tasklist_lock"];

/// What is wrong with a guest's `system_map`/`vmlinux`, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The files do not parse.
    #[error("guest {guest}: {source}\n  fix `system_map`/`vmlinux`, or leave both out: bdmon finds a stock kernel's symbols and types in its memory")]
    Parse {
        /// The guest's name.
        guest: String,
        /// Why.
        source: TargetError,
    },
    /// The running kernel could not be found to compare with.
    #[error("guest {guest}: cannot find its kernel in memory to compare: {source}")]
    Locate {
        /// The guest's name.
        guest: String,
        /// Why.
        source: InspectError,
    },
    /// The running kernel's banner could not be read.
    #[error("guest {guest}: cannot read its linux_banner: {source}")]
    Banner {
        /// The guest's name.
        guest: String,
        /// Why.
        source: TaskError,
    },
    /// The files belong to another kernel.
    #[error("guest {guest}: system_map/vmlinux do not belong to the kernel it runs ({release}): {what}\n  give that kernel's files, or leave both out: bdmon finds them in its memory")]
    Mismatch {
        /// The guest's name.
        guest: String,
        /// The running kernel's release.
        release: String,
        /// What differs.
        what: String,
    },
}

/// Checks `g`'s files; `Ok` says what was checked, `Err` what is wrong. A guest without files
/// is `Ok(None)`.
pub fn check(g: &GuestConfig) -> Result<Option<String>, FilesError> {
    let (Some(map), Some(vmlinux)) = (&g.system_map, &g.vmlinux) else {
        return Ok(None);
    };
    let name = &g.name;
    let files = StockKernel::load(map, vmlinux).map_err(|source| FilesError::Parse {
        guest: name.clone(),
        source,
    })?;
    let bridge = match Bridge::connect_timeout(g.bridge.as_str(), &g.identity(), REACH) {
        Ok(b) => b,
        Err(e) => {
            return Ok(Some(format!(
                "guest {name}: system_map and vmlinux parse; the guest was not reachable ({e}), so \
                 they were not compared with the kernel it runs"
            )))
        }
    };
    let mem = BridgeMem::new(bridge);
    let mut pauser = mem.pauser(Duration::from_secs(2));
    let (running, loc) = StockKernel::discover_paused(&mem, &mut pauser, |_| {
        let r = mem.bridge().regs(0)?;
        Ok::<_, InspectError>((r.cr3, r.cr4))
    })
    .map_err(|source| FilesError::Locate {
        guest: name.clone(),
        source,
    })?;
    let release = running.release().unwrap_or("(unknown release)").to_string();
    let mismatch = |what: String| FilesError::Mismatch {
        guest: name.clone(),
        release: release.clone(),
        what,
    };
    for n in COMPARED {
        let (f, r) = (files.symbols().get(n), running.symbols().get(n));
        if f != r {
            return Err(mismatch(format!(
                "System.map puts {n} at {f:#x?}, the kernel's own table at {r:#x?}"
            )));
        }
    }
    let banner = running.symbols().get("linux_banner").unwrap_or(0);
    let mut text = [0u8; 256];
    KernelMem::new(&mem, loc.clone())
        .read_fresh(banner.wrapping_add(loc.slide), "linux_banner", &mut text)
        .map_err(|source| FilesError::Banner {
            guest: name.clone(),
            source,
        })?;
    let end = text.iter().position(|&c| c == 0).unwrap_or(text.len());
    let banner_text = &text[..end];
    if !contains(vmlinux, banner_text) {
        return Err(mismatch(format!(
            "{} does not hold the running kernel's banner {:?}",
            vmlinux.display(),
            String::from_utf8_lossy(banner_text).trim_end()
        )));
    }
    Ok(Some(format!(
        "guest {name}: system_map and vmlinux belong to the running kernel {release}"
    )))
}

fn contains(path: &Path, needle: &[u8]) -> bool {
    !needle.is_empty()
        && std::fs::read(path)
            .map(|b| b.windows(needle.len()).any(|w| w == needle))
            .unwrap_or(false)
}
