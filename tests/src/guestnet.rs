//! A network for a guest on a [`Site`]: a tap device where bdvmm runs, addressed as the guest's
//! gateway, and (when bdvmm runs inside a kvm host) a route from this machine to the guest
//! through the kvm host, which forwards. A test on this machine then talks to the guest's
//! services at [`GuestNet::guest_ip`] as a client elsewhere on the network would.

use std::process::Command;
use std::sync::Arc;

use crate::netns::{free_subnet, NetLock};
use crate::site::Site;

/// A tap on a site and the addresses around it; removed on drop.
pub struct GuestNet {
    site: Arc<Site>,
    /// The tap's name (give bdvmm `--net tap=<tap>`).
    pub tap: String,
    /// The guest's address.
    pub guest_ip: String,
    /// The tap's address: the guest's gateway.
    pub gateway: String,
    /// The route added on this machine, if any (`10.233.N.0/24`).
    route: Option<String>,
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
                // The kvm host's own link is 10.232.N.0/24, unique among live kvm hosts; its
                // guests get 10.233.N.0/24.
                let n =
                    h.ip.split('.')
                        .nth(2)
                        .unwrap_or_else(|| panic!("kvm host address {}", h.ip))
                        .to_string();
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
                local_ip(&["route", "replace", &route, "via", &h.ip])
                    .unwrap_or_else(|e| panic!("route to the kvm host's guests: {e}"));
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
            let _ = local_ip(&["route", "del", route]);
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
