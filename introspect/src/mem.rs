//! Guest-physical memory sources: the seam between "where the bytes come from" (bdvmm's memfd, a
//! dump file, later the bridge) and everything that interprets them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Why guest memory could not be read.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemError {
    /// The range is not (wholly) guest RAM.
    #[error("guest-physical range {gpa:#x}+{len:#x} is outside guest RAM")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The source failed.
    #[error("reading guest memory failed: {0}")]
    Io(String),
    /// A remote source (a bridge) refused or failed the access; the message says why.
    #[error("{0}")]
    Remote(String),
}

/// Something that holds a guest's physical memory.
pub trait PhysMem {
    /// Fills `buf` from guest-physical `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;

    /// Fills every buffer of `ranges` from its guest-physical address, as if by one [`read`]
    /// each, but as few trips to the source as it can make: a remote source sends them together
    /// (one batched request per batch its wire allows), a caching one fetches only what it does
    /// not hold, exactly the pages asked for (no read-ahead: the caller says what it needs).
    /// Local sources just read each range (the default). On an error, which buffers were filled
    /// is unspecified.
    ///
    /// [`read`]: PhysMem::read
    fn read_many(&self, ranges: &mut [(u64, &mut [u8])]) -> Result<(), MemError> {
        for (gpa, buf) in ranges.iter_mut() {
            self.read(*gpa, buf)?;
        }
        Ok(())
    }

    /// Writes `bytes` at guest-physical `gpa` (sources that are read-only refuse).
    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), MemError> {
        let _ = (gpa, bytes);
        Err(MemError::Io("this memory source is read-only".into()))
    }

    /// Fills `buf` from the memory as it is now, past any cache: for the checks the kill path
    /// makes right before it writes ([`crate::repair`]). Sources without a cache just read.
    fn read_fresh(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.read(gpa, buf)
    }

    /// Reads a little-endian u64.
    fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a little-endian u32.
    fn read_u32(&self, gpa: u64) -> Result<u32, MemError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

/// A guest-physical range and where it starts in the backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length.
    pub size: u64,
    /// Offset in the file.
    pub offset: u64,
}

/// A guest's RAM mapped from a file: bdvmm's memfd (shared, live) or a raw dump.
pub struct MappedMem {
    base: *mut u8,
    len: usize,
    ranges: Vec<Range>,
    writable: bool,
    _file: File,
}

// SAFETY: the mapping stays valid for the struct's lifetime; all accesses are volatile byte copies
// whose concurrent modification by the guest is expected and harmless.
unsafe impl Send for MappedMem {}
// SAFETY: as above; no interior state besides the mapping.
unsafe impl Sync for MappedMem {}

impl MappedMem {
    /// Maps `file` (size `len`) with the given guest-physical `ranges`.
    pub fn new(file: File, len: u64, ranges: Vec<Range>, writable: bool) -> Result<Self, MemError> {
        for r in &ranges {
            let end = r.offset.checked_add(r.size);
            if end.is_none_or(|e| e > len) || r.gpa.checked_add(r.size).is_none() {
                return Err(MemError::Io(format!(
                    "range {r:?} does not fit a {len}-byte file"
                )));
            }
        }
        let len_usize = usize::try_from(len).map_err(|_| MemError::Io("file too large".into()))?;
        if len_usize == 0 {
            return Err(MemError::Io("empty memory file".into()));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: mapping a file we own with a checked length; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_usize,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(MemError::Io(format!(
                "mmap: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Self {
            base: base.cast(),
            len: len_usize,
            ranges,
            writable,
            _file: file,
        })
    }

    /// Opens a raw memory dump whose file offset equals the guest-physical address.
    pub fn open_dump(path: &Path) -> Result<Self, MemError> {
        let file =
            File::open(path).map_err(|e| MemError::Io(format!("{}: {e}", path.display())))?;
        let len = file
            .metadata()
            .map_err(|e| MemError::Io(e.to_string()))?
            .len();
        Self::new(
            file,
            len,
            vec![Range {
                gpa: 0,
                size: len,
                offset: 0,
            }],
            false,
        )
    }

    /// The guest-physical ranges.
    pub fn ranges(&self) -> &[Range] {
        &self.ranges
    }

    /// Every guest-physical address, at a multiple of `stride` within each range, where `needle`
    /// starts (a scan of the live memory, e.g. for a marker page a test program wrote).
    pub fn find(&self, needle: &[u8], stride: usize) -> Vec<u64> {
        let mut hits = Vec::new();
        if needle.is_empty() {
            return hits;
        }
        let mut buf = vec![0u8; needle.len()];
        for r in &self.ranges {
            let mut off = 0u64;
            while off + needle.len() as u64 <= r.size {
                if self.read(r.gpa + off, &mut buf).is_ok() && buf == needle {
                    hits.push(r.gpa + off);
                }
                off += stride.max(1) as u64;
            }
        }
        hits
    }

    /// The host address of `[gpa, gpa + len)`, if it lies inside one mapped range: for zero-copy
    /// users such as RDMA memory registration. The pointer is valid while `self` lives; the guest
    /// may change the bytes behind it at any time.
    pub fn host_ptr(&self, gpa: u64, len: usize) -> Result<std::ptr::NonNull<u8>, MemError> {
        let off = self.offset(gpa, len)?;
        // SAFETY: `off` is inside the mapping (checked by `offset`), so the sum stays in bounds.
        let p = unsafe { self.base.add(off) };
        std::ptr::NonNull::new(p).ok_or(MemError::OutOfRange {
            gpa,
            len: len as u64,
        })
    }

    /// True if the mapping may be written.
    pub fn writable(&self) -> bool {
        self.writable
    }

    fn offset(&self, gpa: u64, len: usize) -> Result<usize, MemError> {
        let oor = MemError::OutOfRange {
            gpa,
            len: len as u64,
        };
        let end = gpa.checked_add(len as u64).ok_or(oor.clone())?;
        self.ranges
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)
            .and_then(|r| usize::try_from(r.offset + (gpa - r.gpa)).ok())
            .filter(|o| o + len <= self.len)
            .ok_or(oor)
    }
}

impl PhysMem for MappedMem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let off = self.offset(gpa, buf.len())?;
        // SAFETY: off..off+len is inside the mapping (checked); the guest may write concurrently,
        // so the copy is volatile: aligned 8-byte words where possible, bytes for the rest.
        unsafe {
            let src = self.base.add(off);
            let mut i = 0;
            if off % 8 == 0 {
                while i + 8 <= buf.len() {
                    let w = std::ptr::read_volatile(src.add(i) as *const u64);
                    buf[i..i + 8].copy_from_slice(&w.to_ne_bytes());
                    i += 8;
                }
            }
            while i < buf.len() {
                buf[i] = std::ptr::read_volatile(src.add(i));
                i += 1;
            }
        }
        Ok(())
    }

    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), MemError> {
        if !self.writable {
            return Err(MemError::Io("memory mapped read-only".into()));
        }
        let off = self.offset(gpa, bytes.len())?;
        // SAFETY: off..off+len is inside a writable shared mapping (checked).
        unsafe {
            let dst = self.base.add(off);
            for (i, b) in bytes.iter().enumerate() {
                std::ptr::write_volatile(dst.add(i), *b);
            }
        }
        Ok(())
    }
}

impl Drop for MappedMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// A memory source over a byte vector (tests, fuzzing, parsed dumps).
pub struct VecMem {
    /// Guest-physical address of `bytes[0]`.
    pub base: u64,
    /// The bytes.
    pub bytes: std::sync::RwLock<Vec<u8>>,
}

impl VecMem {
    /// Memory starting at `base`.
    pub fn new(base: u64, bytes: Vec<u8>) -> Self {
        Self {
            base,
            bytes: std::sync::RwLock::new(bytes),
        }
    }
}

impl PhysMem for VecMem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let bytes = self
            .bytes
            .read()
            .map_err(|_| MemError::Io("poisoned".into()))?;
        let oor = MemError::OutOfRange {
            gpa,
            len: buf.len() as u64,
        };
        let start = gpa
            .checked_sub(self.base)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or(oor.clone())?;
        let src = bytes
            .get(start..start.checked_add(buf.len()).ok_or(oor.clone())?)
            .ok_or(oor)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let mut bytes = self
            .bytes
            .write()
            .map_err(|_| MemError::Io("poisoned".into()))?;
        let oor = MemError::OutOfRange {
            gpa,
            len: data.len() as u64,
        };
        let start = gpa
            .checked_sub(self.base)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or(oor.clone())?;
        let dst = bytes
            .get_mut(start..start.checked_add(data.len()).ok_or(oor.clone())?)
            .ok_or(oor)?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_dump_file_reads_by_physical_address_and_refuses_writes() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut bytes = vec![0u8; 3 * 4096];
        bytes[4096 + 5..4096 + 13].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        f.write_all(&bytes).unwrap();
        let m = MappedMem::open_dump(f.path()).unwrap();
        assert_eq!(m.read_u64(4096 + 5).unwrap(), 0x1122_3344_5566_7788);
        assert!(matches!(
            m.read_u64(3 * 4096 - 4),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(m.write(0, b"x").is_err());
        assert_eq!(m.find(&0x5566_7788u32.to_le_bytes(), 1), vec![4096 + 5]);
    }
}
