//! A network for a guest on a [`Site`]: a tap device where bdvmm runs, addressed as the guest's
//! gateway, and (when bdvmm runs inside a kvm host) a route from this machine to the guest
//! through the kvm host, which forwards. A test on this machine then talks to the guest's
//! services at [`GuestNet::guest_ip`] as a client elsewhere on the network would.

use std::process::Command;
use std::sync::Arc;

use crate::netns::{free_subnet, NetLock};
use crate::site::Site;

/// N of a kvm host's guest subnet 10.233.N.0/24: its own link is 10.232.N.0/24, unique among
/// live kvm hosts.
fn kvm_subnet(h: &crate::kvmhost::KvmHost) -> String {
    h.ip.split('.')
        .nth(2)
        .unwrap_or_else(|| panic!("kvm host address {}", h.ip))
        .to_string()
}

/// A route on this machine to a kvm host's guests, `10.233.N.0/24 via <kvm host> dev <its tap>`.
/// Removed by prefix *and* device: another test process's kvm host may get the same N once this
/// one's tap is gone, and a removal by prefix alone (`ip route del 10.233.N.0/24`) run late would
/// take that host's route instead (seen: a failover test's clients suddenly sent to the default
/// route, mid-run).
struct Route {
    prefix: String,
    via: String,
    dev: String,
}

impl Route {
    fn remove(&self) {
        let _ = local_ip(&[
            "route",
            "del",
            &self.prefix,
            "via",
            &self.via,
            "dev",
            &self.dev,
        ]);
    }
}

fn add_route(prefix: String, h: &crate::kvmhost::KvmHost) -> Route {
    local_ip(&["route", "replace", &prefix, "via", &h.ip, "dev", &h.tap])
        .unwrap_or_else(|e| panic!("route to the kvm host's guests: {e}"));
    Route {
        prefix,
        via: h.ip.clone(),
        dev: h.tap.clone(),
    }
}

/// A tap on a site and the addresses around it; removed on drop.
pub struct GuestNet {
    site: Arc<Site>,
    /// The tap's name (give bdvmm `--net tap=<tap>`).
    pub tap: String,
    /// The guest's address.
    pub guest_ip: String,
    /// The tap's address: the guest's gateway.
    pub gateway: String,
    /// The route added on this machine, if any (`10.233.N.0/24` via the kvm host's tap).
    route: Option<Route>,
}

fn local_ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl GuestNet {
    /// A tap for one guest on `site` (this machine or a kvm host).
    pub fn new(site: &Arc<Site>) -> GuestNet {
        match site.kvm() {
            None => {
                let lock = NetLock::take();
                let n = free_subnet("10.234", std::process::id() % 240)
                    .unwrap_or_else(|e| panic!("{e}"));
                let tap = format!("bdgt{}x{n}", std::process::id() % 10_000);
                let gateway = format!("10.234.{n}.1");
                local_ip(&["tuntap", "add", &tap, "mode", "tap"])
                    .and_then(|_| local_ip(&["addr", "add", &format!("{gateway}/24"), "dev", &tap]))
                    .and_then(|_| local_ip(&["link", "set", &tap, "up"]))
                    .unwrap_or_else(|e| panic!("guest tap {tap}: {e}"));
                drop(lock);
                GuestNet {
                    site: site.clone(),
                    tap,
                    guest_ip: format!("10.234.{n}.2"),
                    gateway,
                    route: None,
                }
            }
            Some(h) => {
                let n = kvm_subnet(h);
                let tap = format!("bdgt{}", h.unique());
                let gateway = format!("10.233.{n}.1");
                h.sh(
                    &format!(
                        "tunctl -t {tap} >/dev/null && ip addr add {gateway}/24 dev {tap} && \
                         ip link set {tap} up && echo 1 > /proc/sys/net/ipv4/ip_forward"
                    ),
                    &[],
                );
                let route = format!("10.233.{n}.0/24");
                let route = add_route(route, h);
                GuestNet {
                    site: site.clone(),
                    tap,
                    guest_ip: format!("10.233.{n}.2"),
                    gateway,
                    route: Some(route),
                }
            }
        }
    }

    /// bdvmm's argument: `--net` and this value.
    pub fn net_arg(&self) -> String {
        format!("tap={}", self.tap)
    }

    /// The guest kernel parameter that the root filesystem's init applies.
    pub fn ip_param(&self) -> String {
        format!("ip={}::{}:255.255.255.0::eth0", self.guest_ip, self.gateway)
    }
}

impl Drop for GuestNet {
    fn drop(&mut self) {
        if let Some(route) = &self.route {
            route.remove();
        }
        match self.site.kvm() {
            // The tap goes with the kvm host.
            Some(_) => {}
            None => {
                let _ = local_ip(&["link", "del", &self.tap]);
            }
        }
    }
}

/// Several guests on one layer-2 network of a [`Site`]: a Linux bridge there whose address is
/// every guest's gateway, and a tap per guest on it; on a kvm host, also a route from this
/// machine through it (as [`GuestNet`]). An address on the LAN that no guest has at boot,
/// [`GuestLan::vip`], is the service address a guest may take (and a standby take over, with a
/// gratuitous ARP).
pub struct GuestLan {
    site: Arc<Site>,
    bridge: String,
    /// Each guest's port: its tap and address (`ports[i]` for guest i).
    pub ports: Vec<LanPort>,
    /// The gateway (the bridge's address on the site).
    pub gateway: String,
    /// The service address, with its prefix length (`A.B.C.D/24`).
    pub vip: String,
    /// The address by which guests reach this machine (the gateway locally; this machine's
    /// address on the kvm host's link otherwise).
    pub this_machine: String,
    route: Option<Route>,
}

/// One guest's place on a [`GuestLan`].
#[derive(Clone, Debug)]
pub struct LanPort {
    /// The tap (give bdvmm `--net tap=<tap>`).
    pub tap: String,
    /// The guest's address.
    pub guest_ip: String,
    /// Its gateway.
    pub gateway: String,
}

impl LanPort {
    /// The guest kernel parameter that the root filesystem's init applies.
    pub fn ip_param(&self) -> String {
        format!("ip={}::{}:255.255.255.0::eth0", self.guest_ip, self.gateway)
    }
}

impl GuestLan {
    /// A LAN of `guests` ports on `site`.
    pub fn new(site: &Arc<Site>, guests: usize) -> GuestLan {
        let mk_ports = |prefix: &str, tag: &str| -> Vec<LanPort> {
            (0..guests)
                .map(|i| LanPort {
                    tap: format!("bdl{tag}t{i}"),
                    guest_ip: format!("{prefix}.{}", i + 2),
                    gateway: format!("{prefix}.1"),
                })
                .collect()
        };
        match site.kvm() {
            None => {
                let lock = NetLock::take();
                let n = free_subnet("10.234", std::process::id() % 240 + 7)
                    .unwrap_or_else(|e| panic!("{e}"));
                let tag = format!("{}x{n}", std::process::id() % 1000);
                let prefix = format!("10.234.{n}");
                let bridge = format!("bdlb{tag}");
                let ports = mk_ports(&prefix, &tag);
                let gateway = format!("{prefix}.1");
                local_ip(&["link", "add", &bridge, "type", "bridge"])
                    .and_then(|_| {
                        local_ip(&["addr", "add", &format!("{gateway}/24"), "dev", &bridge])
                    })
                    .and_then(|_| local_ip(&["link", "set", &bridge, "up"]))
                    .unwrap_or_else(|e| panic!("LAN bridge {bridge}: {e}"));
                for p in &ports {
                    local_ip(&["tuntap", "add", &p.tap, "mode", "tap"])
                        .and_then(|_| local_ip(&["link", "set", &p.tap, "master", &bridge]))
                        .and_then(|_| local_ip(&["link", "set", &p.tap, "up"]))
                        .unwrap_or_else(|e| panic!("LAN tap {}: {e}", p.tap));
                }
                drop(lock);
                GuestLan {
                    site: site.clone(),
                    bridge,
                    ports,
                    vip: format!("{prefix}.100/24"),
                    this_machine: gateway.clone(),
                    gateway,
                    route: None,
                }
            }
            Some(h) => {
                let prefix = format!("10.233.{}", kvm_subnet(h));
                let tag = format!("{}", h.unique());
                let bridge = format!("bdlb{tag}");
                let ports = mk_ports(&prefix, &tag);
                let gateway = format!("{prefix}.1");
                let mut script = format!(
                    "set -e; (ip link add {bridge} type bridge 2>/dev/null || brctl addbr {bridge}); \
                     ip addr add {gateway}/24 dev {bridge}; ip link set {bridge} up; "
                );
                for p in &ports {
                    script.push_str(&format!(
                        "tunctl -t {tap} >/dev/null; (ip link set {tap} master {bridge} 2>/dev/null \
                         || brctl addif {bridge} {tap}); ip link set {tap} up; ",
                        tap = p.tap
                    ));
                }
                script.push_str("echo 1 > /proc/sys/net/ipv4/ip_forward; echo lan-ok");
                let out = h.sh(&script, &[]);
                assert!(out.contains("lan-ok"), "LAN in the kvm host: {out}");
                let route = format!("{prefix}.0/24");
                let route = add_route(route, h);
                GuestLan {
                    site: site.clone(),
                    bridge,
                    ports,
                    vip: format!("{prefix}.100/24"),
                    this_machine: h.host_ip.clone(),
                    gateway,
                    route: Some(route),
                }
            }
        }
    }

    /// The service address without its prefix length.
    pub fn vip_addr(&self) -> &str {
        self.vip.split('/').next().unwrap_or(&self.vip)
    }
}

impl Drop for GuestLan {
    fn drop(&mut self) {
        if let Some(route) = &self.route {
            route.remove();
        }
        if self.site.kvm().is_none() {
            for p in &self.ports {
                let _ = local_ip(&["link", "del", &p.tap]);
            }
            let _ = local_ip(&["link", "del", &self.bridge]);
        }
    }
}
