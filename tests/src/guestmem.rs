//! A read-only view of a running guest's RAM, mapped from the memfd that bdvmm's API hands out.

use std::fs::File;
use std::os::fd::AsRawFd;

use bdvmm::api::MemoryReply;

/// The guest's memfd, mapped shared and read-only into this process.
pub struct GuestMem {
    base: *const u8,
    len: usize,
    map: MemoryReply,
    _file: File,
}

// SAFETY: the mapping is read-only from this side and lives as long as the struct.
unsafe impl Send for GuestMem {}

impl GuestMem {
    /// Maps `file` (the memfd) as described by `map`.
    pub fn new(file: File, map: MemoryReply) -> std::io::Result<Self> {
        let len = map.size as usize;
        // SAFETY: mapping a file we own, shared and read-only; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            base: base as *const u8,
            len,
            map,
            _file: file,
        })
    }

    /// The map bdvmm reported.
    pub fn map(&self) -> &MemoryReply {
        &self.map
    }

    fn offset(&self, gpa: u64, len: usize) -> Option<usize> {
        self.map
            .ranges
            .iter()
            .find(|r| gpa >= r.gpa && gpa + len as u64 <= r.gpa + r.size)
            .map(|r| (r.offset + gpa - r.gpa) as usize)
    }

    /// Copies `len` bytes at guest-physical `gpa` (None if outside RAM).
    pub fn read(&self, gpa: u64, len: usize) -> Option<Vec<u8>> {
        let off = self.offset(gpa, len)?;
        let mut out = vec![0u8; len];
        // SAFETY: off..off+len lies inside the mapping (checked against the reported ranges,
        // which lie inside the memfd); volatile because the guest writes concurrently.
        for (i, b) in out.iter_mut().enumerate() {
            *b = unsafe { std::ptr::read_volatile(self.base.add(off + i)) };
        }
        Some(out)
    }

    /// Reads a little-endian u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Option<u64> {
        let off = self.offset(gpa, 8)?;
        // SAFETY: as in `read`; the address may be unaligned.
        Some(unsafe { std::ptr::read_unaligned(self.base.add(off) as *const u64) })
    }

    /// Every guest-physical address where `needle` starts at a 16-byte boundary... or anywhere
    /// if `aligned` is 1.
    pub fn find(&self, needle: &[u8], aligned: usize) -> Vec<u64> {
        let mut hits = Vec::new();
        for r in &self.map.ranges {
            // SAFETY: the range lies inside the mapping.
            let hay = unsafe {
                std::slice::from_raw_parts(self.base.add(r.offset as usize), r.size as usize)
            };
            let mut i = 0;
            while i + needle.len() <= hay.len() {
                if hay[i] == needle[0] && &hay[i..i + needle.len()] == needle {
                    hits.push(r.gpa + i as u64);
                }
                i += aligned.max(1);
            }
        }
        hits
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}
