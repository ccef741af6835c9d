//! The bridge's Guard and bad-input handling over real TLS on loopback, serving a memory dump (no
//! VM needed). The end-to-end tests with a live guest, network namespaces, the lock and k-of-n
//! writes are in `tests/tests/bridge.rs` at the top of the project.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Config, Fixture, Monitor, Scratch, BACKDOOR};
use introspect::mem::PhysMem;
use rdma_bridge::backend::DumpBackend;
use rdma_bridge::client::{Bridge, BridgeMem, ClientError};
use rdma_bridge::tls::{self, Identity};
use rdma_bridge::wire::{self, code, Frame, Request};
use rustls::{ClientConnection, StreamOwned};

/// A bridge serving a dump (4 MiB of RAM with a Sensor Box of 11 sensors and a marker in "RAM"),
/// dropping sessions idle for `idle_ms`. `mon1` may read, write the hooks, lock and read
/// registers; `mon2` may only fetch the Sensor Box; `rogue` has a certificate but is not listed.
fn start(idle_ms: u64) -> Fixture<DumpBackend> {
    let scratch = Scratch::new(&["mon1", "mon2", "rogue"]);
    let backend = Arc::new(scratch.dump(&common::ram_with_sensor_box(11), false));
    let top = format!("idle_timeout_ms = {idle_ms}\nmax_connections = 8");
    let config = Config {
        audit_log: "audit.jsonl",
        top: &top,
        monitors: &[Monitor::healer("mon1", true), Monitor::sb_only("mon2")],
        tables: "",
    };
    scratch.serve(&config, backend, |_, _| {})
}

impl Fixture<DumpBackend> {
    /// A TLS session as mon1, before HELLO, for sending raw bytes.
    fn raw(&self, name: &str) -> StreamOwned<ClientConnection, TcpStream> {
        let (cfg, sn) = self.id(name).client_config().unwrap();
        let tcp = TcpStream::connect(self.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut s = StreamOwned::new(ClientConnection::new(cfg, sn).unwrap(), tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).unwrap();
        }
        s
    }
}

fn hello(name: &str, id: u64) -> Vec<u8> {
    wire::encode(&Frame::request(
        id,
        Request::Hello {
            monitor_id: name.into(),
            nonce: 1,
        },
    ))
    .unwrap()
}

/// Reads until the bridge closes the session; returns the frames it sent before.
fn drain(s: &mut StreamOwned<ClientConnection, TcpStream>) -> Vec<Frame> {
    let mut dec = wire::Decoder::new();
    let mut buf = [0u8; 4096];
    let mut out = Vec::new();
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                dec.push(&buf[..n]).unwrap();
                while let Some(f) = dec.next_frame().unwrap() {
                    out.push(f);
                }
            }
        }
    }
    out
}

fn error_code(f: &Frame) -> Option<u16> {
    match &f.message {
        wire::Message::Reply(wire::Reply::Error { code, .. }) => Some(*code),
        _ => None,
    }
}

#[test]
fn monitors_read_what_they_were_granted_and_nothing_else() {
    let fx = start(30_000);
    let mut m1 = fx.connect("mon1").unwrap();
    assert_eq!(m1.backdoor(), (BACKDOOR, 1 << 20));
    let sb = m1.sensor_box().unwrap();
    assert_eq!(sb.sensors.len(), 11);
    assert_eq!(sb.value(5), Some(4));
    assert_eq!(m1.read(0x30_0000, 8).unwrap(), b"RAMBYTES");
    let batch = m1
        .read_batch(&[(0x30_0000, 3), (BACKDOOR, 8), (0x30_0003, 5)])
        .unwrap();
    assert_eq!(
        batch,
        vec![b"RAM".to_vec(), b"BKDRSBOX".to_vec(), b"BYTES".to_vec()]
    );

    // mon2 may fetch the Sensor Box but read no RAM, and write nothing.
    let mut m2 = fx.connect("mon2").unwrap();
    assert_eq!(m2.sensor_box().unwrap().sensors.len(), 11);
    let e = m2.read(0x30_0000, 8).unwrap_err();
    assert_eq!(e.code(), Some(code::DENIED), "{e}");
    let e = m2.read_batch(&[(BACKDOOR, 8), (0x30_0000, 8)]).unwrap_err();
    assert_eq!(e.code(), Some(code::DENIED), "{e}");
    let e = m2.write(BACKDOOR + 0x2000, b"x").unwrap_err();
    assert_eq!(e.code(), Some(code::DENIED), "{e}");
    // mon1 may write only the hooks, not the Sensor Box header or RAM.
    for gpa in [BACKDOOR, 0x30_0000, BACKDOOR + 0x2840 - 1] {
        let e = m1.write(gpa, b"xy").unwrap_err();
        assert_eq!(e.code(), Some(code::DENIED), "{gpa:#x}: {e}");
    }
    // Reads past the end of RAM are refused without touching anything.
    let e = m1.read(u64::MAX - 4, 8).unwrap_err();
    assert!(
        e.code().is_some() || matches!(e, ClientError::Wire(_)),
        "{e}"
    );
    // The refused session goes on working.
    assert_eq!(m2.sensor_box().unwrap().sensors.len(), 11);
    fx.wait_audit("denied", "\"op\":\"READ\"");
    fx.wait_audit("denied", "\"op\":\"WRITE\"");
    // REGS needs `regs = true` (mon2 has not); a dump has no vCPUs, and the error says so.
    assert_eq!(m2.regs(0).unwrap_err().code(), Some(code::DENIED));
    let e = m1.regs(0).unwrap_err();
    assert!(e.to_string().contains("no vCPUs"), "{e}");
    assert_eq!(m1.status().unwrap().state, wire::VM_STOPPED);
    // Restarting needs `restart = true`.
    let e = m1.restart().unwrap_err();
    assert_eq!(e.code(), Some(code::DENIED), "{e}");
    // No [rdma] section (or no `verbs` feature): RDMA_CONNECT is refused, TCP goes on.
    let e = m1.rdma_connect(vec![0; 40]).unwrap_err();
    assert_eq!(e.code(), Some(code::UNSUPPORTED), "{e}");
    assert_eq!(m1.read(0x30_0000, 3).unwrap(), b"RAM");
}

#[test]
fn read_many_is_one_read_batch_per_wire_batch_cached_or_not() {
    let fx = start(30_000);
    let mem = BridgeMem::new(fx.connect("mon1").unwrap());
    // 300 scattered 16-byte ranges over the 4 MiB, the marker among them: two READ_BATCHes
    // (at most 256 ranges each).
    let gpas: Vec<u64> = (0..300u64)
        .map(|k| (k * 577 % 1024) * 4096 + 8)
        .chain([0x30_0000])
        .collect();
    let want: Vec<Vec<u8>> = gpas
        .iter()
        .map(|&g| mem.bridge().read(g, 16).unwrap())
        .collect();
    let read_all = |mem: &BridgeMem| {
        let mut bufs = vec![vec![0u8; 16]; gpas.len()];
        let mut ranges: Vec<(u64, &mut [u8])> = gpas
            .iter()
            .zip(bufs.iter_mut())
            .map(|(&g, b)| (g, b.as_mut_slice()))
            .collect();
        let before = mem.round_trips();
        mem.read_many(&mut ranges).unwrap();
        (bufs, mem.round_trips() - before)
    };
    let (got, trips) = read_all(&mem);
    assert_eq!(got, want);
    assert_eq!(&got[300][..8], b"RAMBYTES");
    assert_eq!(trips, 2);
    // Locked: the same two batches, exactly the bytes asked for (no read-ahead), and nothing
    // kept; what plain reads cached is served from the cache.
    mem.lock(Duration::from_secs(2)).unwrap();
    let (got, trips) = read_all(&mem);
    assert_eq!((got == want, trips), (true, 2));
    let mut b = [0u8; 8];
    mem.read(0x30_0000, &mut b).unwrap();
    let before = mem.round_trips();
    let mut c = [0u8; 3];
    mem.read_many(&mut [(0x30_0000, &mut b[..]), (0x30_1000 - 3, &mut c[..])])
        .unwrap();
    assert_eq!((&b, mem.round_trips() - before), (b"RAMBYTES", 0));
    mem.unlock().unwrap();
    // A range the bridge refuses fails the call, and the session goes on.
    let mut b = [0u8; 8];
    let mut c = [0u8; 8];
    assert!(mem
        .read_many(&mut [(0x30_0000, &mut b[..]), (u64::MAX - 4, &mut c[..])])
        .is_err());
    assert_eq!(mem.bridge().read(0x30_0000, 8).unwrap(), b"RAMBYTES");
}

#[test]
fn unauthenticated_peers_get_nothing() {
    let fx = start(30_000);
    // A certificate from the right CA that the config does not list.
    let e = fx.connect("rogue").err().expect("rogue was served");
    assert!(
        matches!(e, ClientError::Io { .. } | ClientError::Session(_)),
        "{e}"
    );
    fx.wait_audit("auth_failed", "not listed");

    // A monitor from another CA: the handshake fails.
    let other = tempfile::tempdir().unwrap();
    tls::pki_init(other.path(), tls::DEFAULT_SERVER_NAME).unwrap();
    tls::pki_issue(other.path(), "mon1").unwrap();
    let mut id = Identity::from_pki_dir(other.path(), "mon1");
    id.ca = fx.pki.join("ca.pem");
    assert!(Bridge::connect(fx.addr, &id).is_err());
    fx.wait_audit("auth_failed", "TLS handshake");

    // No TLS at all: raw frames on the TCP socket.
    let mut tcp = TcpStream::connect(fx.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(&hello("mon1", 1)).unwrap();
    let mut buf = [0u8; 64];
    let got = tcp.read(&mut buf).unwrap_or(0);
    assert!(
        !buf[..got].starts_with(b"BDBR"),
        "served a frame without TLS"
    );

    // mon2's key, claiming to be mon1.
    let mut s = fx.raw("mon2");
    s.write_all(&hello("mon1", 1)).unwrap();
    s.flush().unwrap();
    let frames = drain(&mut s);
    assert_eq!(frames.len(), 1);
    assert_eq!(error_code(&frames[0]), Some(code::UNAUTHENTICATED));
    fx.wait_audit("auth_failed", "HELLO names");

    // Skipping HELLO.
    let mut s = fx.raw("mon1");
    s.write_all(&wire::encode(&Frame::request(1, Request::FetchSb)).unwrap())
        .unwrap();
    s.flush().unwrap();
    let frames = drain(&mut s);
    assert_eq!(error_code(&frames[0]), Some(code::UNAUTHENTICATED));
}

#[test]
fn bad_input_ends_one_session_and_the_bridge_serves_on() {
    let fx = start(400);
    let mut good = fx.connect("mon1").unwrap();

    let mut bad_frames: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("unknown op", {
            let mut f = wire::encode(&Frame::request(2, Request::FetchSb)).unwrap();
            f[5] = 0x42;
            f
        }),
        ("absurd length", {
            let mut f = wire::encode(&Frame::request(2, Request::FetchSb)).unwrap();
            f[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
            f
        }),
        ("too large a write", {
            let mut f = wire::encode(&Frame::request(2, Request::Unlock)).unwrap();
            f[5] = 0x05;
            f[16..20].copy_from_slice(&(4u32 << 20).to_le_bytes());
            f
        }),
        ("replayed request id", hello("mon1", 7)),
    ];
    bad_frames[4]
        .1
        .extend(wire::encode(&Frame::request(7, Request::FetchSb)).unwrap());
    for (what, bytes) in bad_frames {
        let mut s = fx.raw("mon1");
        if what != "replayed request id" {
            s.write_all(&hello("mon1", 1)).unwrap();
        }
        s.write_all(&bytes).unwrap();
        s.flush().unwrap();
        let frames = drain(&mut s);
        let last = frames.last().unwrap_or_else(|| panic!("{what}: no reply"));
        assert_eq!(
            error_code(last),
            Some(code::BAD_REQUEST),
            "{what}: {last:?}"
        );
        // Everyone else is still served.
        assert_eq!(good.sensor_box().unwrap().sensors.len(), 11, "{what}");
    }
    fx.wait_audit("bad_request", "replayed");

    // A peer that stops mid-frame is dropped after the idle timeout; memory stays bounded because
    // the decoder buffers only what arrived.
    let mut s = fx.raw("mon1");
    s.write_all(&hello("mon1", 1)).unwrap();
    let mut partial = wire::encode(&Frame::request(
        2,
        Request::Write {
            gpa: BACKDOOR + 0x2000,
            bytes: vec![0; 1000],
        },
    ))
    .unwrap();
    partial.truncate(500);
    s.write_all(&partial).unwrap();
    s.flush().unwrap();
    let t = Instant::now();
    let frames = drain(&mut s);
    assert!(t.elapsed() < Duration::from_secs(4), "not dropped");
    assert_eq!(frames.len(), 1, "only the HELLO reply: {frames:?}");
    fx.wait_audit("disconnected", "idle");
    // The good session idled out too (400 ms): a fresh one works.
    let mut again = fx.connect("mon2").unwrap();
    assert_eq!(again.sensor_box().unwrap().sensors.len(), 11);
}

#[test]
fn sessions_beyond_a_monitors_cap_are_refused_and_the_bridge_recovers() {
    let fx = start(30_000);
    // Each monitor has `max_sessions_per_monitor` (4) slots of its own: mon2 filling its own
    // locks mon1 out of nothing.
    let held: Vec<Bridge> = (0..4).map(|_| fx.connect("mon2").unwrap()).collect();
    assert!(
        fx.connect("mon2").is_err(),
        "a fifth mon2 session was served"
    );
    fx.wait_audit("refused", "max_sessions_per_monitor");
    let mut m1 = fx.connect("mon1").unwrap();
    assert_eq!(m1.sensor_box().unwrap().sensors.len(), 11);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(mut b) = fx.connect("mon1") {
            assert_eq!(b.sensor_box().unwrap().sensors.len(), 11);
            break;
        }
        assert!(Instant::now() < deadline, "the bridge did not recover");
        std::thread::sleep(Duration::from_millis(50));
    }
}
