//! Moving the service IP: `ip addr add VIP dev DEV`, then gratuitous ARP so that neighbours
//! learn the new owner at once.

use std::process::Command;

/// The service IP a front end adds when it takes over.
#[derive(Debug, Clone)]
pub struct Vip {
    /// `A.B.C.D/NN`.
    pub cidr: String,
    /// The device, e.g. `eth0`.
    pub dev: String,
    /// The `ip` program (and leading arguments), e.g. `/usr/sbin/ip` (or `true` in host tests).
    pub ip_cmd: Vec<String>,
    /// The `arping` program (and leading arguments), e.g. `/bin/busybox arping`.
    pub arping_cmd: Vec<String>,
}

/// Why the service IP could not be added.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    /// The VIP is not `A.B.C.D/NN`.
    #[error("--vip {0:?} is not A.B.C.D/NN")]
    Parse(String),
    /// An empty --ip-cmd or --arping-cmd.
    #[error("--ip-cmd and --arping-cmd must name a program")]
    NoProgram,
    /// `ip addr add` failed.
    #[error("`{cmd}` failed: {why}; check --dev and that the front end may change addresses")]
    Add {
        /// The command line.
        cmd: String,
        /// Exit status and stderr, or the spawn error.
        why: String,
    },
}

/// Splits a command option on whitespace.
pub fn split_cmd(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

impl Vip {
    /// Checks the shape of the VIP and the commands.
    pub fn new(cidr: &str, dev: &str, ip_cmd: &str, arping_cmd: &str) -> Result<Vip, VipError> {
        let (addr, len) = cidr
            .split_once('/')
            .ok_or_else(|| VipError::Parse(cidr.to_string()))?;
        let ok =
            addr.parse::<std::net::Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32);
        if !ok {
            return Err(VipError::Parse(cidr.to_string()));
        }
        let (ip_cmd, arping_cmd) = (split_cmd(ip_cmd), split_cmd(arping_cmd));
        if ip_cmd.is_empty() || arping_cmd.is_empty() {
            return Err(VipError::NoProgram);
        }
        Ok(Vip {
            cidr: cidr.to_string(),
            dev: dev.to_string(),
            ip_cmd,
            arping_cmd,
        })
    }

    fn address(&self) -> &str {
        self.cidr.split('/').next().unwrap_or(&self.cidr)
    }

    /// Adds the VIP (an address already present is fine) and announces it in the background:
    /// gratuitous ARP requests (`arping -U`, three, a second apart — busybox's pace), so that
    /// neighbours replace the failed owner's MAC at once instead of when their entry expires
    /// (tens of seconds). The caller serves without waiting for them; one that fails is logged.
    pub fn add(&self) -> Result<(), VipError> {
        let args = ["addr", "add", self.cidr.as_str(), "dev", self.dev.as_str()];
        // iproute2 says "File exists" (Debian 12) or "Address already assigned" (newer).
        if let Err(why) = run(&self.ip_cmd, &args) {
            let exists = matches!(&why, CmdError::Failed { stderr, .. } if stderr.contains("File exists") || stderr.contains("already assigned"));
            if !exists {
                return Err(VipError::Add {
                    cmd: format!("{} {}", self.ip_cmd.join(" "), args.join(" ")),
                    why: why.to_string(),
                });
            }
        }
        let (cmd, dev, addr, cidr) = (
            self.arping_cmd.clone(),
            self.dev.clone(),
            self.address().to_string(),
            self.cidr.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("garp".into())
            .spawn(move || {
                let args = ["-U", "-c", "3", "-I", dev.as_str(), addr.as_str()];
                match run(&cmd, &args) {
                    Ok(()) => tracing::info!("announced {cidr} (gratuitous ARP)"),
                    Err(why) => tracing::warn!(
                        "gratuitous ARP for {cidr} failed: {why}; neighbours learn the new owner \
                         only when their entry expires (does the kernel have CONFIG_PACKET?)"
                    ),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("gratuitous ARP for {} not sent: {e}", self.cidr);
        }
        Ok(())
    }

    /// Gives the VIP up (a front end fenced by a newer owner, whose kernel still runs, must stop
    /// answering ARP for it); an address already gone is fine, any other failure is logged.
    pub fn remove(&self) {
        let args = ["addr", "del", self.cidr.as_str(), "dev", self.dev.as_str()];
        match run(&self.ip_cmd, &args) {
            Ok(()) => tracing::info!("gave up {}", self.cidr),
            Err(CmdError::Failed { stderr, .. }) if stderr.contains("Cannot assign") => {}
            Err(why) => tracing::warn!("giving up {} failed: {why}", self.cidr),
        }
    }
}

/// Why a command of [`Vip::add`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// An empty command.
    #[error("no program")]
    NoProgram,
    /// It could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        source: std::io::Error,
    },
    /// It ran and failed.
    #[error("{status}: {stderr}")]
    Failed {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its stderr, trimmed.
        stderr: String,
    },
}

fn run(cmd: &[String], args: &[&str]) -> Result<(), CmdError> {
    let (program, lead) = cmd.split_first().ok_or(CmdError::NoProgram)?;
    let out = Command::new(program)
        .args(lead)
        .args(args)
        .output()
        .map_err(|source| CmdError::Spawn {
            program: program.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CmdError::Failed {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_are_checked() {
        assert!(Vip::new("10.0.0.9/24", "eth0", "true", "true").is_ok());
        assert!(Vip::new("10.0.0.9", "eth0", "true", "true").is_err());
        assert!(Vip::new("10.0.0.9/33", "eth0", "true", "true").is_err());
        assert!(Vip::new("10.0.0.9/24", "eth0", "", "true").is_err());
    }

    #[test]
    fn add_runs_the_commands() {
        let v = Vip::new("10.0.0.9/24", "eth0", "true", "/bin/busybox-missing arping").unwrap();
        assert!(v.add().is_ok(), "a failed announcement is only logged");
        let v = Vip::new("10.0.0.9/24", "eth0", "false", "true").unwrap();
        assert!(v.add().is_err());
    }
}
