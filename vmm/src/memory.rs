//! Guest RAM: one sealed memfd, mapped shared, that bdvmm owns and hands to engines and clients.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::layout::MemoryLayout;
use introspect::conv::usize_from;

/// Why guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("cannot create the guest RAM memfd: {0}")]
    Memfd(std::io::Error),
    /// Sizing or sealing the memfd failed.
    #[error("cannot size or seal the guest RAM memfd ({0} bytes): {1}")]
    Size(u64, std::io::Error),
    /// Restricting the memfd's mode failed.
    #[error("cannot make the guest RAM memfd mode 0600: {0}")]
    Mode(std::io::Error),
    /// Mapping the memfd failed.
    #[error("cannot map guest RAM: {0}; is there enough address space and memory for --mem?")]
    Map(vm_memory::mmap::FromRangesError),
}

/// The guest's RAM.
pub struct GuestRam {
    /// The memfd; engines and API clients map it.
    pub file: Arc<File>,
    /// Where each guest-physical range lives in the memfd.
    pub layout: MemoryLayout,
    /// bdvmm's own shared mapping of it.
    pub mem: GuestMemoryMmap,
}

impl GuestRam {
    /// Creates and maps a memfd of `layout.total` bytes.
    ///
    /// The memfd is sealed against shrinking and growing, so a client that maps it can never make
    /// bdvmm's mapping fault by truncating the file.
    pub fn new(layout: MemoryLayout) -> Result<Self, MemoryError> {
        let name = c"bdvmm-guest-ram";
        // SAFETY: `name` is a valid NUL-terminated string; the flags are valid for memfd_create.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(layout.total)
            .map_err(|e| MemoryError::Size(layout.total, e))?;
        // SAFETY: fcntl on a valid fd with an integer argument.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if rc < 0 {
            return Err(MemoryError::Size(
                layout.total,
                std::io::Error::last_os_error(),
            ));
        }
        // A memfd's inode is created mode 0777: anyone holding a descriptor (a read-only API
        // client's, say) could reopen it read-write through /proc/self/fd. Only bdvmm's own uid
        // may.
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(MemoryError::Mode)?;
        }
        let file = Arc::new(file);
        let mem = GuestMemoryMmap::from_ranges_with_files(layout.ranges.iter().map(|r| {
            (
                GuestAddress(r.gpa),
                usize_from(r.size),
                Some(FileOffset::from_arc(file.clone(), r.offset)),
            )
        }))
        .map_err(MemoryError::Map)?;
        Ok(Self { file, layout, mem })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    #[test]
    fn writes_through_the_mapping_are_visible_in_the_memfd() {
        let ram = GuestRam::new(MemoryLayout::new(64).unwrap()).unwrap();
        ram.mem
            .write_slice(b"backdoor", GuestAddress(0x1234))
            .unwrap();
        let mut buf = [0u8; 8];
        ram.file.read_exact_at(&mut buf, 0x1234).unwrap();
        assert_eq!(&buf, b"backdoor");
        // Sealed: nobody can shrink it under us.
        assert!(ram.file.set_len(4096).is_err());
    }
}
