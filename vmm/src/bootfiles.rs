//! Checks on the kernel and initrd a user names, done before any engine starts, so that both
//! engines refuse bad files with the same one-line message.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The kernel formats bdvmm boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux` (PVH entry if it has the note, else the 64-bit entry).
    Elf,
    /// A compressed `bzImage` (Linux boot protocol).
    BzImage,
}

/// A bad boot file.
#[derive(Debug, thiserror::Error)]
pub enum BootFileError {
    /// Cannot open or read.
    #[error("cannot read {what} {path}: {err}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// Not a kernel we can boot.
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage (no ELF magic, no 'HdrS' at 0x202); pass --kernel a Linux bzImage or vmlinux")]
    UnknownKernel(PathBuf),
    /// Empty or not a cpio archive.
    #[error("initrd {0} is not a cpio archive (plain, gzip, xz, zstd, lz4, bzip2 or lzma); rebuild it, e.g. with images/build.sh")]
    UnknownInitrd(PathBuf),
}

fn head(path: &Path, what: &'static str, n: usize) -> Result<Vec<u8>, BootFileError> {
    let read_err = |err| BootFileError::Read {
        what,
        path: path.to_path_buf(),
        err,
    };
    let file = File::open(path).map_err(read_err)?;
    if file.metadata().map_err(read_err)?.is_dir() {
        return Err(read_err(std::io::Error::other("is a directory")));
    }
    let mut buf = Vec::with_capacity(n);
    file.take(n as u64)
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    Ok(buf)
}

/// Identifies the kernel image at `path`.
pub fn kernel_format(path: &Path) -> Result<KernelFormat, BootFileError> {
    let h = head(path, "kernel", 0x210)?;
    if h.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::Elf);
    }
    if h.len() >= 0x206 && &h[0x202..0x206] == b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootFileError::UnknownKernel(path.to_path_buf()))
}

/// Checks that `path` looks like an initramfs.
pub fn check_initrd(path: &Path) -> Result<(), BootFileError> {
    let h = head(path, "initrd", 8)?;
    const MAGICS: &[&[u8]] = &[
        b"070701",           // cpio newc
        b"070702",           // cpio newc with CRC
        b"\x1f\x8b",         // gzip
        b"\xfd7zXZ\0",       // xz
        b"\x28\xb5\x2f\xfd", // zstd
        b"\x02\x21\x4c\x18", // lz4 legacy
        b"BZh",              // bzip2
        b"\x5d\x00\x00",     // lzma
    ];
    if MAGICS.iter().any(|m| h.starts_with(m)) {
        Ok(())
    } else {
        Err(BootFileError::UnknownInitrd(path.to_path_buf()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn recognises_kernels_and_rejects_garbage() {
        let elf = temp(b"\x7fELF\x02\x01\x01");
        assert_eq!(kernel_format(elf.path()).unwrap(), KernelFormat::Elf);
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            kernel_format(temp(&bz).path()).unwrap(),
            KernelFormat::BzImage
        );
        let junk = temp(b"this is not a kernel");
        let msg = kernel_format(junk.path()).unwrap_err().to_string();
        assert!(
            msg.contains("neither an ELF vmlinux nor a bzImage"),
            "{msg}"
        );
        let missing = kernel_format(Path::new("/nonexistent/vmlinuz")).unwrap_err();
        assert!(missing.to_string().contains("cannot read kernel"));
    }

    #[test]
    fn initrd_magic() {
        assert!(check_initrd(temp(b"\x1f\x8b\x08\x00").path()).is_ok());
        assert!(check_initrd(temp(b"070701000").path()).is_ok());
        assert!(check_initrd(temp(b"").path()).is_err());
        assert!(check_initrd(temp(b"garbage!").path()).is_err());
    }
}
