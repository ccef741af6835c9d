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
        let subnet = (std::process::id() * 8 + n) % 250 + 1;
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

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
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
