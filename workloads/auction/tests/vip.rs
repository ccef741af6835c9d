//! The service address moves for real: a network namespace plays the standby's guest, joined to
//! this host by a veth pair. This host holds a neighbour entry for the VIP pointing at the failed
//! owner's MAC (as after the old primary served it); `Vip::add` inside the namespace must make
//! this host's entry point at the namespace's MAC within a few seconds (its gratuitous ARP), not
//! when the stale entry expires; `Vip::remove` gives the address up.
//!
//! Needs root, `ip` (iproute2) and busybox's `arping`; skipped with the reason printed otherwise.

use std::process::Command;
use std::time::{Duration, Instant};

use auction::front::vip::Vip;

fn sh(cmd: &str) -> Result<String, String> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{cmd}`: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

struct Net {
    ns: String,
    host_if: String,
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = sh(&format!("ip link del {}", self.host_if));
        let _ = sh(&format!("ip netns del {}", self.ns));
    }
}

fn busybox() -> Option<&'static str> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

#[test]
fn a_gratuitous_arp_moves_a_neighbours_entry_at_once() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let Some(busybox) = busybox() else {
        eprintln!("skipped: no busybox (arping)");
        return;
    };
    let tag = std::process::id() % 100_000;
    let net = Net {
        ns: format!("bdvip{tag}"),
        host_if: format!("bdvh{tag}"),
    };
    let peer = format!("bdvp{tag}");
    // 10.77.x.0/24 from the pid, so that parallel runs do not collide.
    let x = tag % 250 + 1;
    let (host_ip, vip) = (format!("10.77.{x}.1"), format!("10.77.{x}.100"));
    sh(&format!(
        "ip netns add {ns} && ip link add {h} type veth peer name {peer} && \
         ip link set {peer} netns {ns} && ip addr add {host_ip}/24 dev {h} && ip link set {h} up && \
         ip -n {ns} link set {peer} up && ip -n {ns} link set lo up",
        ns = net.ns,
        h = net.host_if
    ))
    .expect("namespace and veth");
    let ns_mac = sh(&format!(
        "ip -n {} -o link show {peer} | sed -n 's/.*link\\/ether \\([0-9a-f:]*\\).*/\\1/p'",
        net.ns
    ))
    .expect("peer MAC")
    .trim()
    .to_string();
    assert_eq!(ns_mac.len(), 17, "peer MAC {ns_mac:?}");
    // The failed owner's MAC, as the host learnt it while the old primary served.
    let old_mac = "02:00:5e:00:53:01";
    sh(&format!(
        "ip neigh replace {vip} lladdr {old_mac} dev {} nud reachable",
        net.host_if
    ))
    .expect("stale neighbour entry");
    let v = Vip::new(
        &format!("{vip}/24"),
        &peer,
        &format!("ip netns exec {} ip", net.ns),
        &format!("ip netns exec {} {busybox} arping", net.ns),
    )
    .expect("vip");
    v.add().expect("add the VIP");
    let addrs = sh(&format!("ip -n {} -o addr show dev {peer}", net.ns)).expect("addresses");
    assert!(addrs.contains(&vip), "VIP not added: {addrs}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let entry = loop {
        let e = sh(&format!("ip neigh show {vip} dev {}", net.host_if)).unwrap_or_default();
        if e.contains(&ns_mac) || Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        entry.contains(&ns_mac),
        "the host still sends the VIP to {entry:?}, not to the new owner {ns_mac}"
    );
    // Adding again (a retried TAKEOVER) is fine; giving it up removes it, twice is fine.
    v.add().expect("add again");
    v.remove();
    v.remove();
    let addrs = sh(&format!("ip -n {} -o addr show dev {peer}", net.ns)).expect("addresses");
    assert!(!addrs.contains(&vip), "VIP still there: {addrs}");
}
