//! The fixtures the bridge's integration tests share (`guard`, `hostile`, `rdma_isolation`,
//! `audit_full_disk`): a scratch directory with a PKI, guest memory in a file, the bridge's config
//! written from a list of monitors, a bridge serving on 127.0.0.1 from a thread, and monitors
//! connecting to it and reading its audit log.
//!
//! Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use introspect::sensorbox::{self, Sensor, SensorClass};
use rdma_bridge::backend::{Backend, DumpBackend};
use rdma_bridge::client::{Bridge, ClientError};
use rdma_bridge::config::BridgeConfig;
use rdma_bridge::server::Server;
use rdma_bridge::tls::{self, Identity};

/// Where the backdoor range (the Sensor Box, then the hooks) starts in the test guests.
pub const BACKDOOR: u64 = 0x10_0000;
/// The repair hooks: the mailbox, 0x2000 into the backdoor range.
pub const HOOKS: u64 = BACKDOOR + 0x2000;
/// The backdoor range as the backends report it: 1 MiB at [`BACKDOOR`].
pub const BACKDOOR_RANGE: (u64, u64) = (BACKDOOR, 1 << 20);
/// The size of the test guests' RAM.
pub const RAM_SIZE: usize = 4 << 20;

/// `n` level sensors `SENSOR_0`.. with ids from 1, threshold 100, each valued at its index.
pub fn sensors(n: u32) -> Vec<Sensor> {
    (0..n)
        .map(|i| Sensor {
            id: 1 + i,
            class: SensorClass::Level,
            flags: 1,
            threshold: 100,
            value: u64::from(i),
            updated: 0,
            name: format!("SENSOR_{i}"),
        })
        .collect()
}

/// 4 MiB of guest RAM with a Sensor Box of `n` [`sensors`] at [`BACKDOOR`] and the marker
/// `RAMBYTES` at 0x30_0000.
pub fn ram_with_sensor_box(n: u32) -> Vec<u8> {
    let mut ram = vec![0u8; RAM_SIZE];
    let sb = sensorbox::encode(&sensors(n), 250, 2);
    let bd = usize::try_from(BACKDOOR).unwrap();
    ram[bd..bd + sb.len()].copy_from_slice(&sb);
    ram[0x30_0000..0x30_0008].copy_from_slice(b"RAMBYTES");
    ram
}

/// One `[[monitor]]` of the config; its certificate is `pki/<name>.pem`.
pub struct Monitor<'a> {
    pub name: &'a str,
    pub read: &'a [&'a str],
    pub write: &'a [&'a str],
    pub lock: bool,
    pub regs: bool,
}

impl<'a> Monitor<'a> {
    /// May fetch the Sensor Box and nothing else.
    pub const fn sb_only(name: &'a str) -> Self {
        Monitor {
            name,
            read: &["sb"],
            write: &[],
            lock: false,
            regs: false,
        }
    }

    /// May read the Sensor Box and RAM, take the lock and write the hooks; reads vCPU registers
    /// if `regs`.
    pub const fn healer(name: &'a str, regs: bool) -> Self {
        Monitor {
            name,
            read: &["sb", "ram"],
            write: &["hooks"],
            lock: true,
            regs,
        }
    }

    fn toml(&self) -> String {
        let list = |l: &[&str]| {
            let quoted: Vec<String> = l.iter().map(|s| format!("{s:?}")).collect();
            quoted.join(", ")
        };
        let mut t = format!(
            "[[monitor]]\nname = {:?}\ncert = \"pki/{}.pem\"\nread = [{}]\n",
            self.name,
            self.name,
            list(self.read)
        );
        if !self.write.is_empty() {
            t.push_str(&format!("write = [{}]\n", list(self.write)));
        }
        if self.lock {
            t.push_str("lock = true\n");
        }
        if self.regs {
            t.push_str("regs = true\n");
        }
        t
    }
}

/// The bridge's config: listening on 127.0.0.1 (any port), the TLS files of the [`Scratch`] PKI.
pub struct Config<'a> {
    /// Relative to the scratch directory, or absolute.
    pub audit_log: &'a str,
    /// More top-level keys (before any table), e.g. `idle_timeout_ms = 400`.
    pub top: &'a str,
    pub monitors: &'a [Monitor<'a>],
    /// More tables, after the monitors, e.g. `[lock]` or `[agreement]`.
    pub tables: &'a str,
}

impl Config<'_> {
    /// The config's TOML text.
    pub fn toml(&self) -> String {
        let mut t = format!(
            "listen = \"127.0.0.1:0\"\naudit_log = {:?}\n{}\n\
             [tls]\nca = \"pki/ca.pem\"\ncert = \"pki/bridge.pem\"\nkey = \"pki/bridge.key\"\n",
            self.audit_log, self.top
        );
        for m in self.monitors {
            t.push_str(&m.toml());
        }
        t.push_str(self.tables);
        t.push('\n');
        t
    }
}

/// A scratch directory with a PKI in `pki/`: a CA, the bridge's key and certificate and one for
/// each monitor name given (listed in the config or not).
pub struct Scratch {
    dir: tempfile::TempDir,
    pki: PathBuf,
}

impl Scratch {
    pub fn new(names: &[&str]) -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        tls::pki_init(&pki, tls::DEFAULT_SERVER_NAME).unwrap();
        for m in names {
            tls::pki_issue(&pki, m).unwrap();
        }
        Scratch { dir, pki }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `ram` to `guest.mem` and opens it as a dump with the backdoor at [`BACKDOOR`]:
    /// read-only, or read-write and shared when `writable` (granted WRITEs change the file).
    pub fn dump(&self, ram: &[u8], writable: bool) -> DumpBackend {
        let path = self.path().join("guest.mem");
        std::fs::write(&path, ram).unwrap();
        if writable {
            DumpBackend::open_writable(&path, BACKDOOR_RANGE).unwrap()
        } else {
            DumpBackend::open(&path, BACKDOOR_RANGE).unwrap()
        }
    }

    /// Writes `config` to `bridge.toml`, binds a bridge serving `backend`, lets `prepare` adjust
    /// the bound server (e.g. give it an RDMA device) and runs it on a thread of its own.
    pub fn serve<B: Backend + 'static>(
        self,
        config: &Config,
        backend: Arc<B>,
        prepare: impl FnOnce(&mut Server, &BridgeConfig),
    ) -> Fixture<B> {
        let cfg_path = self.path().join("bridge.toml");
        std::fs::write(&cfg_path, config.toml()).unwrap();
        let cfg = BridgeConfig::load(&cfg_path).unwrap();
        let mut server = Server::bind(&cfg, backend.clone()).unwrap();
        prepare(&mut server, &cfg);
        let addr = server.local_addr().unwrap();
        std::thread::spawn(move || server.run());
        Fixture {
            audit: self.path().join(config.audit_log),
            pki: self.pki,
            addr,
            backend,
            _dir: self.dir,
        }
    }
}

/// A running bridge and what the tests look at.
pub struct Fixture<B> {
    pub pki: PathBuf,
    pub addr: SocketAddr,
    /// The audit log.
    pub audit: PathBuf,
    pub backend: Arc<B>,
    _dir: tempfile::TempDir,
}

impl<B> Fixture<B> {
    /// The identity of monitor `name` from the fixture's PKI.
    pub fn id(&self, name: &str) -> Identity {
        Identity::from_pki_dir(&self.pki, name)
    }

    /// A session as monitor `name`.
    pub fn connect(&self, name: &str) -> Result<Bridge, ClientError> {
        Bridge::connect(self.addr, &self.id(name))
    }

    /// Every whole record of the audit log so far. A last line still being appended is left for
    /// the next read; every whole line must be JSON.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
            .collect()
    }

    /// The audit records of `event`.
    pub fn audit_events(&self, event: &str) -> Vec<serde_json::Value> {
        self.audit_records()
            .into_iter()
            .filter(|e| e["event"] == event)
            .collect()
    }

    /// Waits (bounded) for an audit record of `event` whose JSON text contains `needle`.
    pub fn wait_audit(&self, event: &str, needle: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self
                .audit_events(event)
                .into_iter()
                .find(|e| e.to_string().contains(needle))
            {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no {event} event with {needle:?} in {:?}",
                self.audit_records()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
