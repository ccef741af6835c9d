//! A random nonzero u64 for the region's generation, from getrandom(2) or /dev/urandom.

use std::io::{self, Read};

/// A random nonzero u64.
pub(crate) fn nonzero_u64() -> io::Result<u64> {
    loop {
        let v = u64::from_ne_bytes(random_bytes()?);
        if v != 0 {
            return Ok(v);
        }
    }
}

fn random_bytes() -> io::Result<[u8; 8]> {
    let mut b = [0u8; 8];
    loop {
        // SAFETY: getrandom writes at most b.len() bytes into b, which we own.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast::<libc::c_void>(), b.len(), 0) };
        if n == 8 {
            return Ok(b);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ENOSYS) => break,
            _ if n >= 0 => continue,
            _ => return Err(e),
        }
    }
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}
