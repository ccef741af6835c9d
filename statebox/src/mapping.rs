//! The State Box region's memory: an anonymous private mapping at [`STATEBOX_VA`], locked in RAM
//! (a monitor walks the page tables without the guest's help, so every page must be present),
//! not inherited by children and left out of core dumps.

use std::io;
use std::ptr::NonNull;

use crate::abi::STATEBOX_VA;

/// Errors of mapping the region.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// Something is already mapped at the fixed address (another region, or the C library's).
    #[error("the State Box address {STATEBOX_VA:#x} is already mapped in this process (one region per process): reuse the existing region")]
    Occupied,
    /// The kernel placed the mapping elsewhere (it ignores MAP_FIXED_NOREPLACE before Linux 4.17).
    #[error("the kernel mapped the State Box region at {got:#x}, not {STATEBOX_VA:#x}: Linux 4.17 or later is needed (MAP_FIXED_NOREPLACE)")]
    Moved {
        /// Where the kernel put it.
        got: usize,
    },
    /// mmap failed.
    #[error("mapping {len} bytes for the State Box region failed: {source}")]
    Mmap {
        /// Bytes asked for.
        len: usize,
        /// The OS error.
        source: io::Error,
    },
    /// mlock failed (usually RLIMIT_MEMLOCK).
    #[error("locking the State Box region ({len} bytes) in RAM failed: {source}; raise RLIMIT_MEMLOCK (ulimit -l) to at least {kib} KiB or create a smaller region", kib = len.div_ceil(1024))]
    Mlock {
        /// Bytes to lock.
        len: usize,
        /// The OS error.
        source: io::Error,
    },
    /// madvise failed.
    #[error("madvise({advice}) on the State Box region failed: {source}")]
    Madvise {
        /// The advice given.
        advice: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// The mapped region; unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes (a multiple of the page size) at [`STATEBOX_VA`], zeroed, locked,
    /// MADV_DONTFORK and MADV_DONTDUMP.
    pub(crate) fn new(len: usize) -> Result<Mapping, MapError> {
        let want = usize::try_from(STATEBOX_VA).map_err(|_| MapError::Moved { got: 0 })?;
        // SAFETY: mmap with MAP_FIXED_NOREPLACE never replaces an existing mapping, so no memory
        // this process uses can change; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                want as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Err(MapError::Occupied);
            }
            return Err(MapError::Mmap { len, source: e });
        }
        let got = p as usize;
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            return Err(MapError::Moved { got });
        };
        // From here on, dropping `m` unmaps what we mapped.
        let m = Mapping { ptr, len };
        if got != want {
            return Err(MapError::Moved { got });
        }
        m.advise(libc::MADV_DONTFORK, "MADV_DONTFORK")?;
        m.advise(libc::MADV_DONTDUMP, "MADV_DONTDUMP")?;
        // SAFETY: the range is our own mapping of `len` bytes.
        if unsafe { libc::mlock(m.ptr.as_ptr().cast::<libc::c_void>(), len) } != 0 {
            return Err(MapError::Mlock {
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(m)
    }

    fn advise(&self, advice: libc::c_int, name: &'static str) -> Result<(), MapError> {
        // SAFETY: the range is our own mapping; these advices do not change its contents.
        let rc =
            unsafe { libc::madvise(self.ptr.as_ptr().cast::<libc::c_void>(), self.len, advice) };
        if rc != 0 {
            return Err(MapError::Madvise {
                advice: name,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The mapping's first byte.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The mapping's length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range and nothing refers to it once the owner drops it.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast::<libc::c_void>(), self.len);
        }
    }
}
