//! Network namespaces for tests: a target namespace joined to the test's own namespace by a veth
//! pair, so a monitor (the test process) reaches a bridge that lives with bdvmm in another
//! namespace. Everything is deleted on drop.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace `name` with `ns_ip` inside and `host_ip` on the test's side of the veth.
pub struct NetNs {
    /// Namespace name (for `ip netns exec`).
    pub name: String,
    host_if: String,
    /// The address inside the namespace.
    pub ns_ip: String,
    /// The address on the test's side.
    pub host_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e} (install iproute2)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// Creates the namespace and the veth pair, with addresses 10.231.N.1 (inside) and .2.
    pub fn new() -> Result<NetNs, String> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}x{n}", std::process::id() % 100_000);
        // Held until our side of the veth has its address, so that test processes running at
        // the same time never pick the same subnet.
        let _lock = NetLock::take();
        let subnet = free_subnet("10.231", std::process::id() * 8 + n)?;
        let ns = NetNs {
            name: format!("bdt{tag}"),
            host_if: format!("bdh{tag}"),
            ns_ip: format!("10.231.{subnet}.1"),
            host_ip: format!("10.231.{subnet}.2"),
        };
        let peer = format!("bdp{tag}");
        ip(&["netns", "add", &ns.name])?;
        let setup = || -> Result<(), String> {
            ip(&[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ])?;
            ip(&["link", "set", &peer, "netns", &ns.name])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/24", ns.host_ip),
                "dev",
                &ns.host_if,
            ])?;
            ip(&["link", "set", &ns.host_if, "up"])?;
            let exec = |a: &[&str]| {
                let mut v = vec!["netns", "exec", &ns.name, "ip"];
                v.extend_from_slice(a);
                ip(&v)
            };
            exec(&["addr", "add", &format!("{}/24", ns.ns_ip), "dev", &peer])?;
            exec(&["link", "set", &peer, "up"])?;
            exec(&["link", "set", "lo", "up"])
        };
        setup()?;
        Ok(ns)
    }
}

impl NetNs {
    /// Adds `10.231.S.last` on the test's side of the veth (a second local address, e.g. for a
    /// service that one test cuts off from the namespace while the first address stays
    /// reachable) and returns it.
    pub fn add_host_address(&self, last: u8) -> Result<String, String> {
        let prefix = self
            .host_ip
            .rsplit_once('.')
            .map(|(p, _)| p.to_owned())
            .ok_or_else(|| format!("bad host address {}", self.host_ip))?;
        let addr = format!("{prefix}.{last}");
        ip(&["addr", "add", &format!("{addr}/32"), "dev", &self.host_if])?;
        Ok(addr)
    }

    /// Inside the namespace, drops every packet to `addr` (`cut`) or stops dropping them: a
    /// network partition between the namespace and that address only.
    pub fn blackhole(&self, addr: &str, cut: bool) -> Result<(), String> {
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "route",
            if cut { "add" } else { "del" },
            "blackhole",
            &format!("{addr}/32"),
        ])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// An exclusive lock, across test processes, on choosing and configuring test subnets.
pub struct NetLock(std::fs::File);

impl NetLock {
    /// Waits for the lock.
    pub fn take() -> NetLock {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(std::env::temp_dir().join("backdoors-tests-net.lock"))
            .expect("open the subnet lock file");
        // SAFETY: flock on a valid fd we own; blocks until the lock is ours.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
        NetLock(f)
    }
}

impl Drop for NetLock {
    fn drop(&mut self) {
        // SAFETY: as above; closing the file would release it too.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&self.0), libc::LOCK_UN) };
    }
}

/// A /24 in `prefix`.0.0/16 (e.g. "10.231") that no interface of this machine uses, trying from
/// `seed` on; hold a [`NetLock`] until the subnet is configured.
pub fn free_subnet(prefix: &str, seed: u32) -> Result<u32, String> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .map_err(|e| format!("cannot run ip: {e} (install iproute2)"))?;
    let used = String::from_utf8_lossy(&out.stdout).into_owned();
    (0..240)
        .map(|i| (seed + i) % 240 + 10)
        .find(|n| !used.contains(&format!(" {prefix}.{n}.")))
        .ok_or_else(|| format!("no free {prefix}.N.0/24 subnet for a test host"))
}

/// A command for `program`, run inside `netns` if given.
pub fn command(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}
