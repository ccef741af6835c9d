//! The kernel's release (`uname -r`), read from its `linux_banner` ("Linux version <release> ..."),
//! for messages that name the kernel.

use crate::tasks::KernelMem;

/// What `linux_banner` starts with.
const PREFIX: &[u8] = b"Linux version ";
/// Bytes read: the prefix and a release far longer than any distribution's.
const READ: usize = 128;

/// The release in the banner at kernel virtual `banner_va`, if it reads as one (printable ASCII,
/// at most 64 bytes); `None` if it cannot be read or is not a banner.
pub fn release(km: &KernelMem, banner_va: u64) -> Option<String> {
    let mut buf = [0u8; READ];
    km.read_fresh(banner_va, "linux_banner", &mut buf).ok()?;
    parse(&buf)
}

/// The release in banner bytes `b`.
pub fn parse(b: &[u8]) -> Option<String> {
    let rest = b.strip_prefix(PREFIX)?;
    let end = rest.iter().position(|&c| c == b' ' || c == 0)?;
    let rel = rest.get(..end)?;
    let ok = !rel.is_empty() && rel.len() <= 64 && rel.iter().all(u8::is_ascii_graphic);
    ok.then(|| String::from_utf8_lossy(rel).into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_release_is_the_banners_third_word() {
        let b = b"Linux version 6.12.9+bpo-cloud-amd64 (debian-kernel@lists.debian.org) (gcc";
        assert_eq!(super::parse(b).as_deref(), Some("6.12.9+bpo-cloud-amd64"));
        assert_eq!(super::parse(b"Linux version \x01\x02 x"), None);
        assert_eq!(super::parse(b"Linux version 6.1.0"), None);
        assert_eq!(super::parse(b"not a banner"), None);
    }
}
