//! What the host tests share: a private PostgreSQL, front end processes, admin and raw requests.
#![allow(dead_code)] // each test file uses its own part

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use auction::adminctl;
use auction::pg::{self, Cluster};

/// The tests share two cores: one at a time.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

pub fn free_port() -> u16 {
    let l = TcpListener::bind((LOCALHOST, 0)).unwrap();
    l.local_addr().unwrap().port()
}

pub fn cluster() -> Option<Cluster> {
    if let Err(e) = pg::installed() {
        println!("SKIPPED: {e}");
        return None;
    }
    Some(Cluster::start(&[LOCALHOST], free_port()).expect("start PostgreSQL"))
}

/// A front end process, killed on drop.
pub struct Front {
    child: Child,
    pub client: SocketAddr,
    pub admin: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl Front {
    pub fn start(pg: &Cluster, name: &str, extra: &[&str]) -> Front {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_bd-auction-front"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--db", &pg.conninfo(LOCALHOST), "--name", name])
            .args(["--vip", "10.99.0.1/24", "--dev", "lo"])
            .args(["--ip-cmd", "true", "--arping-cmd", "true"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(File::create(log.path()).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = |key: &str| -> SocketAddr {
            let w = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or_else(|| panic!("front end {name} did not start: {line:?}"));
            w.parse().unwrap()
        };
        let (client, admin) = (addr("client="), addr("admin="));
        Front {
            child,
            client,
            admin,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill() on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(i32::try_from(self.pid()).unwrap(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// Waits until every thread of the process is stopped.
    pub fn wait_stopped(&self, within: Duration) {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if all_threads_stopped(self.pid()) {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("front end {} never stopped\n{}", self.pid(), self.log());
    }

    pub fn admin(&self, request: &[u8]) -> String {
        adminctl::send(self.admin, request, ADMIN_TIMEOUT)
            .unwrap_or_else(|e| panic!("admin: {e}\n{}", self.log()))
    }

    pub fn status(&self) -> String {
        self.admin(b"STATUS\n")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().to_string())
            })
            .is_some_and(|rest| rest.starts_with('T') || rest.starts_with('t'))
    })
}

pub fn field(line: &str, key: &str) -> i64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// A client connection for raw request lines.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    /// Connects to `addr`.
    pub fn open(addr: SocketAddr) -> Conn {
        let writer = TcpStream::connect(addr).unwrap();
        writer.set_read_timeout(Some(ADMIN_TIMEOUT)).unwrap();
        let reader = BufReader::new(writer.try_clone().unwrap());
        Conn { reader, writer }
    }

    /// Sends `line` (a newline is added) and returns the reply line, or "" at end of stream.
    pub fn send(&mut self, line: &str) -> String {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        let mut reply = String::new();
        self.reader.read_line(&mut reply).unwrap();
        reply.trim_end().to_string()
    }
}

impl Conn {
    /// Whether the front end closed the connection (end of stream or reset).
    pub fn closed(&mut self) -> bool {
        let mut rest = String::new();
        matches!(self.reader.read_line(&mut rest), Ok(0) | Err(_))
    }
}

/// Sends one request line to `addr` on a new connection and returns the reply line.
pub fn request(addr: SocketAddr, line: &str) -> String {
    Conn::open(addr).send(line)
}

/// Whether PostgreSQL is installed; prints why a test is skipped if not.
pub fn pg_present() -> bool {
    match pg::installed() {
        Ok(()) => true,
        Err(e) => {
            println!("SKIPPED: {e}");
            false
        }
    }
}
