//! The client side of the agent: programs run inside a kvm host, seen from the test process as
//! children with captured output, and Unix sockets inside it reached through a local relay.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::proto::{self, tag, Exit, Request};
use crate::child::Output;

/// How long connecting to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection to the agent and sends `req` (and `stdin`).
pub fn connect(agent: SocketAddr, req: &Request, stdin: &[u8]) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&agent, CONNECT_TIMEOUT)?;
    s.set_nodelay(true)?;
    let mut line = serde_json::to_vec(req).expect("serializable");
    line.push(b'\n');
    s.write_all(&line)?;
    s.write_all(stdin)?;
    Ok(s)
}

/// Asks the agent whether it is there.
pub fn ping(agent: SocketAddr) -> io::Result<()> {
    let mut s = connect(agent, &Request::Ping, &[])?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    if answer == "pong\n" {
        Ok(())
    } else {
        Err(io::Error::other(format!("agent answered {answer:?}")))
    }
}

/// A program running inside a kvm host.
pub struct RemoteChild {
    control: TcpStream,
    exit: Arc<Mutex<Option<ExitStatus>>>,
    failed: Arc<Mutex<Option<String>>>,
    /// Its output.
    pub output: Output,
}

impl RemoteChild {
    /// Starts `argv` inside the kvm host whose agent is `agent`.
    pub fn spawn(
        agent: SocketAddr,
        argv: &[String],
        env: &[(String, String)],
        stdin: &[u8],
    ) -> io::Result<RemoteChild> {
        let req = Request::Exec {
            argv: argv.to_vec(),
            env: env.to_vec(),
            cwd: None,
            stdin_len: stdin.len() as u64,
        };
        let s = connect(agent, &req, stdin)?;
        let output = Output::default();
        let exit = Arc::new(Mutex::new(None));
        let failed = Arc::new(Mutex::new(None));
        let mut reader = s.try_clone()?;
        {
            let (output, exit, failed) = (output.clone(), exit.clone(), failed.clone());
            std::thread::spawn(move || loop {
                match proto::read_frame(&mut reader) {
                    Ok(Some((tag::STDOUT, b))) => output.push_stdout(&b),
                    Ok(Some((tag::STDERR, b))) => output.push_stderr(&b),
                    Ok(Some((tag::EXIT, b))) => {
                        let st = serde_json::from_slice::<Exit>(&b)
                            .map(Exit::status)
                            .unwrap_or_else(|_| {
                                Exit {
                                    code: None,
                                    signal: None,
                                }
                                .status()
                            });
                        *exit.lock().unwrap() = Some(st);
                        return;
                    }
                    Ok(Some((tag::FAILED, b))) => {
                        *failed.lock().unwrap() = Some(String::from_utf8_lossy(&b).into_owned());
                        *exit.lock().unwrap() = Some(
                            Exit {
                                code: Some(127),
                                signal: None,
                            }
                            .status(),
                        );
                        return;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        // The agent (or the kvm host) went away: the program is gone with it.
                        let mut e = exit.lock().unwrap();
                        if e.is_none() {
                            *failed.lock().unwrap() =
                                Some("lost the connection to the kvm host's agent".into());
                            *e = Some(
                                Exit {
                                    code: None,
                                    signal: Some(libc::SIGKILL),
                                }
                                .status(),
                            );
                        }
                        return;
                    }
                }
            });
        }
        Ok(RemoteChild {
            control: s,
            exit,
            failed,
            output,
        })
    }

    /// Its exit status, once it has ended.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        *self.exit.lock().unwrap()
    }

    /// Why it could not be started (or the agent was lost), if so.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap().clone()
    }

    /// Sends `sig` to its process group.
    pub fn signal(&self, sig: i32) {
        let _ = proto::write_frame(&mut &self.control, tag::KILL, &sig.to_le_bytes());
    }

    /// Waits for it to end; None on timeout.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RemoteChild {
    /// Closing the connection makes the agent end the program (SIGTERM, then SIGKILL).
    fn drop(&mut self) {
        let _ = self.control.shutdown(Shutdown::Both);
    }
}

/// A local Unix socket whose connections are carried to a Unix socket inside a kvm host.
pub struct UnixRelay {
    path: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl UnixRelay {
    /// Listens at `local` and relays every connection to `remote` inside the kvm host.
    pub fn start(agent: SocketAddr, remote: &str, local: &Path) -> io::Result<UnixRelay> {
        let listener = UnixListener::bind(local)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let remote = remote.to_string();
        {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let Ok(local) = conn else { continue };
                    let remote = remote.clone();
                    std::thread::spawn(move || relay_one(agent, &remote, local));
                }
            });
        }
        Ok(UnixRelay {
            path: local.to_path_buf(),
            stop,
        })
    }

    /// The local socket.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnixRelay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn relay_one(agent: SocketAddr, remote: &str, local: UnixStream) {
    let req = Request::Unix {
        path: remote.to_string(),
    };
    let Ok(mut tcp) = connect(agent, &req, &[]) else {
        return;
    };
    match proto::read_line(&mut tcp, 4096) {
        Ok(l) if l == b"ok" => {}
        _ => return,
    }
    let (Ok(mut t_in), Ok(mut l_out)) = (tcp.try_clone(), local.try_clone()) else {
        return;
    };
    let down = std::thread::spawn(move || {
        let _ = io::copy(&mut t_in, &mut l_out);
        let _ = l_out.shutdown(Shutdown::Both);
    });
    let (mut l_in, mut t_out) = (local, tcp);
    let _ = io::copy(&mut l_in, &mut t_out);
    let _ = t_out.shutdown(Shutdown::Both);
    let _ = down.join();
}
