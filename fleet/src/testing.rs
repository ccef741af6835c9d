//! A real etcd server for tests: `/usr/bin/etcd` (Debian package `etcd-server`) on free loopback
//! ports, its data in a temporary directory.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the etcd binary is expected.
pub const ETCD: &str = "/usr/bin/etcd";
/// Longest [`EtcdServer::start`] waits for etcd to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// One etcd member, killed on drop.
pub struct EtcdServer {
    child: Option<Child>,
    ip: String,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

fn free_port(ip: &str) -> u16 {
    let l = TcpListener::bind((ip, 0)).expect("cannot bind a free port");
    l.local_addr()
        .expect("local address of a bound socket")
        .port()
}

impl EtcdServer {
    /// Starts etcd and waits until it answers. Panics (with what to install) if it cannot.
    pub fn start() -> EtcdServer {
        Self::start_on("127.0.0.1")
    }

    /// As [`EtcdServer::start`], listening on local address `ip` (e.g. a veth's, so that a
    /// monitor in a network namespace reaches it and a test can cut that path).
    pub fn start_on(ip: &str) -> EtcdServer {
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} is missing: install the Debian package etcd-server (scripts/install-deps.sh)"
        );
        let dir = tempfile::tempdir().expect("cannot make a temporary directory for etcd");
        let mut s = EtcdServer {
            child: None,
            ip: ip.to_owned(),
            client_port: free_port(ip),
            peer_port: free_port(ip),
            dir,
        };
        s.spawn();
        s
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn(&mut self) {
        let client = format!("http://{}:{}", self.ip, self.client_port);
        let peer = format!("http://{}:{}", self.ip, self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("cannot open etcd's log file");
        let log2 = log.try_clone().expect("cannot duplicate etcd's log file");
        let child = Command::new(ETCD)
            .arg("--name")
            .arg("fleet-test")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("fleet-test={peer}"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {ETCD} (package etcd-server): {e}"));
        self.child = Some(child);
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.healthy() {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("etcd exited with {status}; its log:\n{}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within {START_TIMEOUT:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether etcd answers `GET /health` with a healthy status.
    pub fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect((self.ip.as_str(), self.client_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// etcd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The client endpoint, `IP:PORT`.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.ip, self.client_port)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: sends a signal to our own child process; no memory is involved.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// Stops it gracefully (SIGTERM) and waits.
    pub fn stop(&mut self) {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Kills it (SIGKILL) and waits.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Stops it and starts it again with the same data and ports.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Stops it, deletes its data and starts it again on the same ports: etcd "restarted empty".
    pub fn restart_empty(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path().join("data"));
        self.spawn();
    }

    /// Starts it again after [`EtcdServer::stop`] or [`EtcdServer::kill`] (same data and ports).
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Freezes it (SIGSTOP): connections stay open but nothing answers, like a partition.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Thaws it after [`EtcdServer::freeze`] (SIGCONT).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
