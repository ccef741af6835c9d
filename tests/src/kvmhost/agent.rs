//! The agent that runs inside a kvm host (PID 1's respawned child): it runs programs and reaches
//! Unix sockets for the test process outside, over the protocol of [`super::proto`].
//!
//! The agent trusts its clients: it only ever listens inside a throw-away test VM whose only
//! network is a tap device on the machine that started it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::proto::{self, tag, Exit, Request};

/// How long a process group has between SIGTERM and SIGKILL once its client went away.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long the output pumps may run on after the program itself ended (its children may hold
/// the pipes).
const DRAIN: Duration = Duration::from_secs(2);

/// Serves clients forever on `listen`.
pub fn serve(listen: &str) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    eprintln!("bd-kvmhost agent: listening on {}", listener.local_addr()?);
    serve_on(listener);
    Ok(())
}

/// Serves clients of `listener` forever.
pub fn serve_on(listener: TcpListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                std::thread::spawn(move || {
                    if let Err(e) = handle(s) {
                        eprintln!("bd-kvmhost agent: connection: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("bd-kvmhost agent: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn handle(mut s: TcpStream) -> io::Result<()> {
    let line = proto::read_line(&mut s, proto::MAX_REQUEST)?;
    let req: Request = serde_json::from_slice(&line)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad request: {e}")))?;
    match req {
        Request::Ping => s.write_all(b"pong\n"),
        Request::Unix { path } => splice_unix(s, &path),
        Request::Exec {
            argv,
            env,
            cwd,
            stdin_len,
        } => exec(s, argv, env, cwd, stdin_len),
    }
}

fn splice_unix(mut tcp: TcpStream, path: &str) -> io::Result<()> {
    let unix = match UnixStream::connect(path) {
        Ok(u) => u,
        Err(e) => return tcp.write_all(format!("error: connect {path}: {e}\n").as_bytes()),
    };
    tcp.write_all(b"ok\n")?;
    let (mut t_in, mut u_out) = (tcp.try_clone()?, unix.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut t_in, &mut u_out);
        let _ = u_out.shutdown(Shutdown::Both);
    });
    let (mut u_in, mut t_out) = (unix, tcp);
    let _ = io::copy(&mut u_in, &mut t_out);
    let _ = t_out.shutdown(Shutdown::Both);
    let _ = up.join();
    Ok(())
}

fn signal_group(pgid: u32, sig: i32) {
    // Only a positive pgid: 0 would be the agent's own group and a wrapped one -1, everyone.
    let Some(pgid) = libc::pid_t::try_from(pgid).ok().filter(|p| *p > 0) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals the process group the agent created.
    unsafe { libc::kill(-pgid, sig) };
}

fn exec(
    mut s: TcpStream,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    stdin_len: u64,
) -> io::Result<()> {
    let Some(stdin_len) = usize::try_from(stdin_len)
        .ok()
        .filter(|_| stdin_len <= proto::MAX_STDIN)
    else {
        return proto::write_frame(&mut s, tag::FAILED, b"stdin too large");
    };
    let mut stdin_bytes = vec![0u8; stdin_len];
    s.read_exact(&mut stdin_bytes)?;
    let Some((prog, args)) = argv.split_first() else {
        return proto::write_frame(&mut s, tag::FAILED, b"empty argv");
    };
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .envs(env)
        .process_group(0)
        .stdin(if stdin_len > 0 {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return proto::write_frame(&mut s, tag::FAILED, format!("{prog}: {e}").as_bytes())
        }
    };
    let pgid = child.id();
    if let Some(mut input) = child.stdin.take() {
        std::thread::spawn(move || {
            let _ = input.write_all(&stdin_bytes);
        });
    }
    let out = Arc::new(Mutex::new(s.try_clone()?));
    let mut pumps = Vec::new();
    for (t, src) in [
        (
            tag::STDOUT,
            Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
        ),
        (tag::STDERR, Box::new(child.stderr.take().expect("piped"))),
    ] {
        let out = out.clone();
        pumps.push(std::thread::spawn(move || pump(src, t, &out)));
    }
    // The client's side: signals, and its end of stream, which ends the program.
    let finished = Arc::new(AtomicBool::new(false));
    let mut control = s.try_clone()?;
    {
        let finished = finished.clone();
        std::thread::spawn(move || {
            loop {
                match proto::read_frame(&mut control) {
                    Ok(Some((tag::KILL, p))) if p.len() == 4 => {
                        signal_group(pgid, i32::from_le_bytes([p[0], p[1], p[2], p[3]]));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            if finished.load(Ordering::SeqCst) {
                return;
            }
            signal_group(pgid, libc::SIGTERM);
            let deadline = Instant::now() + TERM_GRACE;
            while Instant::now() < deadline {
                if finished.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            signal_group(pgid, libc::SIGKILL);
        });
    }
    let status = child.wait()?;
    finished.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + DRAIN;
    for p in pumps {
        while !p.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let exit = Exit {
        code: status.code(),
        signal: status.signal(),
    };
    let json = serde_json::to_vec(&exit).expect("serializable");
    let mut w = out.lock().unwrap_or_else(|e| e.into_inner());
    proto::write_frame(&mut *w, tag::EXIT, &json)?;
    // Whatever the program left behind in its group goes with it.
    signal_group(pgid, libc::SIGKILL);
    Ok(())
}

fn pump(mut src: Box<dyn Read + Send>, t: u8, out: &Mutex<TcpStream>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match src.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut w = out.lock().unwrap_or_else(|e| e.into_inner());
                if proto::write_frame(&mut *w, t, &buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvmhost::remote::{self, RemoteChild, UnixRelay};

    fn agent() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || serve_on(l));
        addr
    }

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn runs_programs_with_stdin_output_and_exit_status() {
        let a = agent();
        remote::ping(a).unwrap();
        let c = RemoteChild::spawn(
            a,
            &argv(&["sh", "-c", "cat; echo err >&2; exit 3"]),
            &[],
            b"hello",
        )
        .unwrap();
        let st = c.wait_exit(Duration::from_secs(10)).expect("ends");
        assert_eq!(st.code(), Some(3));
        assert_eq!(c.output.stdout(), "hello");
        assert_eq!(c.output.stderr(), "err\n");
        let bad = RemoteChild::spawn(a, &argv(&["/nonexistent"]), &[], &[]).unwrap();
        assert_eq!(
            bad.wait_exit(Duration::from_secs(10)).unwrap().code(),
            Some(127)
        );
        assert!(bad.failure().unwrap().contains("/nonexistent"));
    }

    #[test]
    fn a_signal_or_a_dropped_client_ends_the_program() {
        let a = agent();
        let c = RemoteChild::spawn(a, &argv(&["sleep", "60"]), &[], &[]).unwrap();
        c.signal(libc::SIGKILL);
        use std::os::unix::process::ExitStatusExt;
        let st = c.wait_exit(Duration::from_secs(10)).expect("killed");
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        // A client that goes away takes its program with it.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let c = RemoteChild::spawn(
            a,
            &argv(&[
                "sh",
                "-c",
                &format!("echo $$ > {}; exec sleep 60", pidfile.display()),
            ]),
            &[],
            &[],
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&pidfile).map_or(true, |s| s.trim().is_empty()) {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        drop(c);
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: kill with signal 0 only checks that the process exists.
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(Instant::now() < deadline, "the program outlived its client");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn relays_a_unix_socket() {
        let a = agent();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("echo.sock");
        let l = std::os::unix::net::UnixListener::bind(&target).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = io::copy(&mut r, &mut w);
            }
        });
        let relay =
            UnixRelay::start(a, target.to_str().unwrap(), &dir.path().join("local.sock")).unwrap();
        let mut s = UnixStream::connect(relay.path()).unwrap();
        s.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }
}
