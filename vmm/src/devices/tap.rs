//! Host tap devices for virtio-net, and the `--net tap=NAME[,mac=MAC]` value ([`NetSpec`]).
//!
//! bdvmm never creates a tap: the operator makes one (`ip tuntap add NAME mode tap user USER`,
//! `ip link set NAME up`, then bridges or routes it) and names it. [`Tap::open`] attaches to it
//! through `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte virtio-net header
//! (`TUNSETVNETHDRSZ`: the virtio 1.x header, `num_buffers` included) and the offloads the
//! device offers (`TUNSETOFFLOAD`; today none, so the tap checksums and segments itself). The fd
//! is non-blocking; vhost-net reads and writes it.
//!
//! `TUNSETIFF` would create a missing tap, so [`Tap::open`] first looks the name up
//! (`if_nametoindex`, in the calling thread's network namespace) and refuses a missing one. A
//! tap deleted between that look-up and the attach would be recreated (owned by bdvmm, gone when
//! it exits); nothing worse.

use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::str::FromStr;

/// Where the tun/tap control device lives.
pub const TUN_PATH: &str = "/dev/net/tun";
/// Longest interface name Linux accepts (`IFNAMSIZ` less the NUL).
pub const TAP_NAME_MAX: usize = 15;
/// Size of the virtio-net header on the tap: `struct virtio_net_hdr_mrg_rxbuf`, which virtio
/// 1.x uses whether or not `VIRTIO_NET_F_MRG_RXBUF` is negotiated.
pub const VNET_HDR_LEN: i32 = 12;

/// Why a tap could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// No interface by that name.
    #[error(
        "no tap device {0:?}: create it first (ip tuntap add {0} mode tap user $USER; \
         ip link set {0} up); bdvmm does not create taps"
    )]
    NoSuchTap(String),
    /// Not allowed to attach to it.
    #[error(
        "permission denied attaching tap {0:?}: run bdvmm as the user the tap was made for \
         (ip tuntap add {0} mode tap user USER) or with CAP_NET_ADMIN, and check that \
         {TUN_PATH} is readable and writable"
    )]
    PermissionDenied(String),
    /// No `/dev/net/tun`.
    #[error(
        "{TUN_PATH} is missing, so tap {0:?} cannot be opened: modprobe tun (in a container, \
         pass the device in: --device {TUN_PATH})"
    )]
    NoTunDevice(String),
    /// The interface exists but is a tun device or not a tun/tap at all.
    #[error(
        "{0:?} is not a tap device (a tun device or another kind of interface): give a tap made \
         with ip tuntap add NAME mode tap"
    )]
    NotATap(String),
    /// Another process (another VM) is attached.
    #[error("tap {0:?} is in use by another program (another VM?): stop it or give another tap")]
    Busy(String),
    /// The name cannot be an interface name.
    #[error("{0:?} cannot be a tap name: 1 to {TAP_NAME_MAX} characters, no '/', ':', ',', '=' or spaces")]
    BadName(String),
    /// Anything else.
    #[error("cannot set up tap {name:?} ({what}): {err}")]
    Setup {
        /// The tap.
        name: String,
        /// The step that failed.
        what: &'static str,
        /// What the kernel said.
        err: io::Error,
    },
}

/// Whether `name` is a name Linux accepts for an interface (`dev_valid_name`) and that fits in
/// a `--net` value and QEMU's option syntax (no ',' or '=').
pub fn valid_tap_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= TAP_NAME_MAX
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| matches!(c, '/' | ':' | ',' | '=' | '\0') || c.is_whitespace())
}

/// An attached tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Attaches to the existing tap `name` with the given `TUNSETOFFLOAD` flags (`TUN_F_*`).
    pub fn open(name: &str, offload: u32) -> Result<Self, TapError> {
        Self::open_at(name, offload, Path::new(TUN_PATH))
    }

    /// [`Tap::open`] through another tun control device (tests).
    pub(crate) fn open_at(name: &str, offload: u32, tun: &Path) -> Result<Self, TapError> {
        if !valid_tap_name(name) {
            return Err(TapError::BadName(name.to_owned()));
        }
        let cname = CString::new(name).map_err(|_| TapError::BadName(name.to_owned()))?;
        // SAFETY: a valid NUL-terminated string; no memory is kept.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::ENODEV) | Some(libc::ENXIO) => TapError::NoSuchTap(name.to_owned()),
                _ => TapError::Setup {
                    name: name.to_owned(),
                    what: "looking it up",
                    err,
                },
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(tun)
            .map_err(|err| match err.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                    TapError::NoTunDevice(name.to_owned())
                }
                _ => classify(name, "opening /dev/net/tun", err),
            })?;
        let mut req = IfReq {
            name: [0; 16],
            flags: tun_flags(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR),
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is laid out as (40
        // bytes) and outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(classify(name, "TUNSETIFF", io::Error::last_os_error()));
        }
        let hdr: libc::c_int = VNET_HDR_LEN;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) };
        if rc < 0 {
            return Err(classify(
                name,
                "TUNSETVNETHDRSZ",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(offload),
            )
        };
        if rc < 0 {
            return Err(classify(name, "TUNSETOFFLOAD", io::Error::last_os_error()));
        }
        Ok(Self {
            file,
            name: name.to_owned(),
        })
    }

    /// A stand-in on `/dev/null` for tests that never reach the network.
    #[cfg(test)]
    pub(crate) fn stand_in(name: &str) -> Self {
        Self {
            file: File::open("/dev/null").unwrap(),
            name: name.to_owned(),
        }
    }

    /// The tap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The attached fd (what vhost-net's `SET_BACKEND` gets).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// The TUNSETIFF flags as the `short` of `struct ifreq` (they all fit in 16 bits).
fn tun_flags(flags: libc::c_int) -> libc::c_short {
    libc::c_short::try_from(flags & 0xffff).unwrap_or(0)
}

/// The error a failed tun/tap step means for the user.
fn classify(name: &str, what: &'static str, err: io::Error) -> TapError {
    let name = name.to_owned();
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied(name),
        Some(libc::EBUSY) => TapError::Busy(name),
        Some(libc::EINVAL) if what == "TUNSETIFF" => TapError::NotATap(name),
        _ => TapError::Setup { name, what, err },
    }
}

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered unicast address derived from the tap name (FNV-1a, so the same
    /// name gives the same address on every host and every bdvmm version).
    pub fn for_tap(name: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_le_bytes();
        // Locally administered (bit 1), unicast (bit 0 clear).
        Self([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A `--net` value: `tap=NAME[,mac=MAC]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    /// The existing tap to attach.
    pub tap: String,
    /// The guest's address: given, or [`MacAddr::for_tap`].
    pub mac: MacAddr,
}

/// Why a `--net` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetSpecError {
    /// No `tap=`.
    #[error("--net needs a tap: --net tap=NAME[,mac=MAC]")]
    NoTap,
    /// A bad tap name.
    #[error(
        "--net tap={0:?}: a tap name has 1 to {TAP_NAME_MAX} characters, no '/', ':', ',', '=' or spaces"
    )]
    BadTap(String),
    /// A bad MAC.
    #[error(
        "--net mac={0:?}: give six hex bytes like 02:00:00:00:00:01, unicast (the first byte \
         even) and not all zero"
    )]
    BadMac(String),
    /// An option we do not know, or one without `=`.
    #[error("--net option {0:?} is not known: --net tap=NAME[,mac=MAC]")]
    UnknownOption(String),
    /// An option given twice.
    #[error("--net option {0} is given twice")]
    Repeated(&'static str),
}

impl FromStr for MacAddr {
    type Err = NetSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetSpecError::BadMac(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() || out[0] & 1 != 0 || out == [0; 6] {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

impl NetSpec {
    /// A spec from its parts (a config file's `[[net]]` table): the tap, and the MAC as text or
    /// None for [`MacAddr::for_tap`].
    pub fn new(tap: &str, mac: Option<&str>) -> Result<Self, NetSpecError> {
        if !valid_tap_name(tap) {
            return Err(NetSpecError::BadTap(tap.to_owned()));
        }
        let mac = match mac {
            Some(m) => m.parse()?,
            None => MacAddr::for_tap(tap),
        };
        Ok(Self {
            tap: tap.to_owned(),
            mac,
        })
    }
}

impl FromStr for NetSpec {
    type Err = NetSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut mac = None;
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("tap", name)) => {
                    if tap.is_some() {
                        return Err(NetSpecError::Repeated("tap"));
                    }
                    tap = Some(name);
                }
                Some(("mac", m)) => {
                    if mac.is_some() {
                        return Err(NetSpecError::Repeated("mac"));
                    }
                    mac = Some(m);
                }
                _ => return Err(NetSpecError::UnknownOption(opt.to_owned())),
            }
        }
        Self::new(tap.ok_or(NetSpecError::NoTap)?, mac)
    }
}

impl fmt::Display for NetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tap={},mac={}", self.tap, self.mac)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_a_stable_default_mac() {
        let n: NetSpec = "tap=tap0".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, MacAddr::for_tap("tap0"));
        assert_eq!(n.mac.0[0] & 0x03, 0x02, "locally administered unicast");
        // Stable across runs and versions: FNV-1a of the name, pinned here.
        assert_eq!(n.mac.to_string(), "16:d0:ac:07:ef:fc");
        assert_ne!(MacAddr::for_tap("tap0"), MacAddr::for_tap("tap1"));
        let n: NetSpec = "tap=t1,mac=02:AB:cd:00:00:01".parse().unwrap();
        assert_eq!(n.mac, MacAddr([2, 0xab, 0xcd, 0, 0, 1]));
        assert_eq!(n.to_string(), "tap=t1,mac=02:ab:cd:00:00:01");
        assert_eq!(n.to_string().parse::<NetSpec>().unwrap(), n);
        let n: NetSpec = "mac=02:00:00:00:00:02,tap=t2".parse().unwrap();
        assert_eq!(n.tap, "t2");
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let e = |s: &str| s.parse::<NetSpec>().unwrap_err();
        assert_eq!(e(""), NetSpecError::UnknownOption(String::new()));
        assert_eq!(e("mac=02:00:00:00:00:01"), NetSpecError::NoTap);
        assert_eq!(e("tap0"), NetSpecError::UnknownOption("tap0".into()));
        assert_eq!(e("tap=a,tap=b"), NetSpecError::Repeated("tap"));
        assert_eq!(e("tap=a,ro"), NetSpecError::UnknownOption("ro".into()));
        for name in [
            "",
            "a/b",
            "a:b",
            "a b",
            ".",
            "..",
            "sixteen-chars-xx",
            "a=b",
        ] {
            assert_eq!(e(&format!("tap={name}")), NetSpecError::BadTap(name.into()));
        }
        assert!(valid_tap_name("fifteen-chars-x"));
        for mac in [
            "01:00:00:00:00:01", // multicast
            "00:00:00:00:00:00",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02:0:00:00:00:001",
            "02-00-00-00-00-01",
            "zz:00:00:00:00:01",
        ] {
            assert_eq!(
                e(&format!("tap=t,mac={mac}")),
                NetSpecError::BadMac(mac.into())
            );
        }
        assert!(NetSpecError::NoTap.to_string().contains("tap=NAME"));
    }

    #[test]
    fn errno_maps_to_what_the_user_must_do() {
        let c = |errno, what| classify("t0", what, io::Error::from_raw_os_error(errno));
        assert!(matches!(
            c(libc::EPERM, "TUNSETIFF"),
            TapError::PermissionDenied(_)
        ));
        assert!(matches!(
            c(libc::EACCES, "opening"),
            TapError::PermissionDenied(_)
        ));
        assert!(matches!(c(libc::EBUSY, "TUNSETIFF"), TapError::Busy(_)));
        assert!(matches!(c(libc::EINVAL, "TUNSETIFF"), TapError::NotATap(_)));
        assert!(matches!(
            c(libc::EINVAL, "TUNSETOFFLOAD"),
            TapError::Setup { .. }
        ));
        let msg = TapError::NoSuchTap("t0".into()).to_string();
        assert!(msg.contains("ip tuntap add t0 mode tap"), "{msg}");
        assert!(TapError::PermissionDenied("t0".into())
            .to_string()
            .contains("permission denied"));
        assert!(TapError::NoTunDevice("t0".into())
            .to_string()
            .contains("/dev/net/tun is missing"));
    }

    /// Whether taps can be made here: root, with `/dev/net/tun`.
    pub(crate) fn can_make_taps() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root || !Path::new(TUN_PATH).exists() {
            eprintln!("skipped: making taps needs root and {TUN_PATH}");
            return false;
        }
        true
    }

    /// Moves the calling thread into a fresh network namespace (gone when the thread ends).
    pub(crate) fn fresh_netns() -> bool {
        // SAFETY: unshare on the calling thread only; no memory is passed.
        let ok = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0;
        if !ok {
            eprintln!(
                "skipped: cannot make a network namespace: {}",
                io::Error::last_os_error()
            );
        }
        ok
    }

    /// Makes a persistent tun (`tap` false) or tap interface in the thread's namespace.
    pub(crate) fn make_interface(name: &str, tap: bool) {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(TUN_PATH)
            .unwrap();
        let kind = if tap { libc::IFF_TAP } else { libc::IFF_TUN };
        let mut req = IfReq {
            name: [0; 16],
            flags: tun_flags(kind | libc::IFF_NO_PI),
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: as in Tap::open.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        // SAFETY: TUNSETPERSIST takes its flag by value.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETPERSIST,
                libc::c_ulong::from(1u32),
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    }

    /// Runs `f` on a thread of its own in a fresh network namespace, if taps can be made.
    pub(crate) fn in_netns(f: impl FnOnce() + Send + 'static) {
        if !can_make_taps() {
            return;
        }
        std::thread::spawn(move || {
            if fresh_netns() {
                f();
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn an_existing_tap_opens_and_nothing_else_does() {
        in_netns(|| {
            make_interface("bdt0", true);
            make_interface("bdtun0", false);
            let tap = Tap::open("bdt0", 0).unwrap();
            assert_eq!(tap.name(), "bdt0");
            // SAFETY: F_GETFL on a valid fd.
            let fl = unsafe { libc::fcntl(tap.file().as_raw_fd(), libc::F_GETFL) };
            assert_ne!(fl & libc::O_NONBLOCK, 0, "non-blocking");
            // Attached once already: a second VM is refused.
            assert!(matches!(Tap::open("bdt0", 0), Err(TapError::Busy(n)) if n == "bdt0"));
            drop(tap);
            assert!(Tap::open("bdt0", 0).is_ok(), "free again once closed");
            // A missing tap is not created.
            let e = Tap::open("bdnope", 0).unwrap_err();
            assert!(matches!(&e, TapError::NoSuchTap(n) if n == "bdnope"), "{e}");
            // SAFETY: a valid NUL-terminated string.
            let idx = unsafe { libc::if_nametoindex(c"bdnope".as_ptr()) };
            assert_eq!(idx, 0, "the missing tap was created");
            assert!(matches!(Tap::open("bdtun0", 0), Err(TapError::NotATap(_))));
            assert!(matches!(Tap::open("lo", 0), Err(TapError::NotATap(_))));
            let e = Tap::open_at("bdt0", 0, Path::new("/nonexistent/tun")).unwrap_err();
            assert!(matches!(e, TapError::NoTunDevice(_)), "{e}");
        });
    }
}
