//! State Boxes read from a live (stopped) process's memory through `/proc/<pid>/mem`: the host
//! tests' stand-in for a monitor that reads a failed guest's boxes through its page tables.
//! Everything read is validated by `statebox::abi`; a bad slot is reported and skipped.

use std::fs::File;
use std::os::unix::fs::FileExt;

use statebox::abi::{parse_slot, AbiError, BoxCopy, Header, STATEBOX_VA};

/// Why a process's boxes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// `/proc/<pid>/mem` could not be opened or read.
    #[error("reading /proc/{pid}/mem at {addr:#x}: {source} (is the process alive, and may we ptrace it?)")]
    Read {
        /// The process.
        pid: u32,
        /// The address read.
        addr: u64,
        /// The error.
        source: std::io::Error,
    },
    /// The region header is not valid.
    #[error("process {pid} has no valid State Box region: {source}")]
    Header {
        /// The process.
        pid: u32,
        /// Why.
        source: AbiError,
    },
}

/// The boxes found in one process.
#[derive(Debug)]
pub struct Extracted {
    /// The region's header.
    pub header: Header,
    /// Every live box (slots with id != 0).
    pub boxes: Vec<BoxCopy>,
    /// Slots refused, with why.
    pub refused: Vec<(u32, AbiError)>,
}

fn read_at(mem: &File, pid: u32, addr: u64, len: u64) -> Result<Vec<u8>, ExtractError> {
    let err = |source| ExtractError::Read { pid, addr, source };
    let len = usize::try_from(len).map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
    let mut buf = vec![0; len];
    mem.read_exact_at(&mut buf, addr).map_err(err)?;
    Ok(buf)
}

/// Reads the header, then every slot, of process `pid`'s State Box region.
pub fn from_process(pid: u32) -> Result<Extracted, ExtractError> {
    let path = format!("/proc/{pid}/mem");
    let mem = File::open(&path).map_err(|source| ExtractError::Read {
        pid,
        addr: STATEBOX_VA,
        source,
    })?;
    let head = read_at(&mem, pid, STATEBOX_VA, 4096)?;
    let header = Header::parse(&head).map_err(|source| ExtractError::Header { pid, source })?;
    let mut out = Extracted {
        header,
        boxes: Vec::new(),
        refused: Vec::new(),
    };
    for slot in 0..header.slot_count {
        let Some(off) = header.slot_offset(slot) else {
            continue;
        };
        let bytes = read_at(&mem, pid, STATEBOX_VA + off, u64::from(header.slot_size))?;
        match parse_slot(&header, slot, &bytes) {
            Ok(Some(b)) => out.boxes.push(b),
            Ok(None) => {}
            Err(e) => out.refused.push((slot, e)),
        }
    }
    Ok(out)
}
