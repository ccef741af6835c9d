//! The Guard against hostile networks and hostile (listed) monitors, over real TLS on loopback: a
//! flood of unauthenticated peers trickling their handshakes, a monitor that takes the lock without
//! the permission, asks for too long a lease or renews it forever, writes without the lock, or reads
//! vCPU registers without the permission.
//!
//! The backend is a writable memory file standing in for a VM (pause and resume only counted), so
//! that WRITEs can be seen to land or not.

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Config, Fixture, Monitor, Scratch, HOOKS};
use introspect::hooks::{KillTarget, Mailbox};
use introspect::mem::{MappedMem, PhysMem};
use rdma_bridge::backend::{Backend, BackendError, DumpBackend, Layout};
use rdma_bridge::client::BridgeMem;
use rdma_bridge::wire::{code, Regs, VmStatus, VM_RUNNING};

/// Guest memory in a writable file; pause and resume are counted, nothing else.
struct FileVm {
    dump: DumpBackend,
    pauses: AtomicUsize,
}

impl Backend for FileVm {
    fn layout(&self) -> &Layout {
        self.dump.layout()
    }
    fn mem(&self) -> &MappedMem {
        self.dump.mem()
    }
    fn pause(&self, _lease: Duration) -> Result<u64, BackendError> {
        self.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(1)
    }
    fn resume(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn regs(&self, _vcpu: u8) -> Result<Regs, BackendError> {
        Ok(Regs {
            cr3: 0x1000,
            ..Regs::default()
        })
    }
    fn status(&self) -> Result<VmStatus, BackendError> {
        Ok(VmStatus {
            state: VM_RUNNING,
            vcpus: 1,
            uptime_ms: 0,
            pauses: 0,
        })
    }
    fn restart(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// A bridge on 127.0.0.1 with `top` added to the config's top level (before any table) and
/// `tables` after the monitors. Monitors: `mon1` and `mon3` may read, write the hooks, lock and
/// read registers; `mon2` may only fetch the Sensor Box.
fn start(top: &str, tables: &str) -> Fixture<FileVm> {
    let scratch = Scratch::new(&["mon1", "mon2", "mon3"]);
    let backend = Arc::new(FileVm {
        dump: scratch.dump(&common::ram_with_sensor_box(4), true),
        pauses: AtomicUsize::new(0),
    });
    let config = Config {
        audit_log: "audit.jsonl",
        top,
        monitors: &[
            Monitor::healer("mon1", true),
            Monitor::sb_only("mon2"),
            Monitor::healer("mon3", true),
        ],
        tables,
    };
    scratch.serve(&config, backend, |_, _| {})
}

impl Fixture<FileVm> {
    fn guest(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.backend.mem().read(gpa, &mut b).unwrap();
        b
    }
}

/// A TCP connection to `to` from `from` (any port): an attacker on another address.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap(),
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap();
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own; the stream closes it on drop.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let local = sockaddr(SocketAddrV4::new(from, 0));
    // SAFETY: `local` is a valid sockaddr_in of `len` bytes that outlives the call.
    if unsafe { libc::bind(fd, std::ptr::from_ref(&local).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let remote = sockaddr(to);
    // SAFETY: as above.
    if unsafe { libc::connect(fd, std::ptr::from_ref(&remote).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

#[test]
fn a_trickled_preauth_flood_locks_no_monitor_out() {
    // Defaults only: the old bridge had one pool of 32 slots, taken at accept.
    let fx = start("", "");
    let attacker = Ipv4Addr::new(127, 0, 0, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    // 40 peers (more than the old cap of 32), each sending one byte of a TLS record every 3 s and
    // reconnecting whenever the bridge drops it, for as long as the test runs.
    let peers: Vec<_> = (0..40)
        .map(|_| {
            let (stop, opened, addr) = (stop.clone(), opened.clone(), fx.addr);
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok(mut s) = connect_from(attacker, addr) else {
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    };
                    opened.fetch_add(1, Ordering::SeqCst);
                    for byte in [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01].iter().cycle() {
                        if s.write_all(&[*byte]).is_err() {
                            break;
                        }
                        let next = Instant::now() + Duration::from_secs(3);
                        while Instant::now() < next && !stop.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while opened.load(Ordering::SeqCst) < 40 {
        assert!(Instant::now() < deadline, "the attackers could not connect");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A valid monitor, now and again later (after the first trickled bytes, past the old 5 s
    // per-read timeout), still gets in and is served.
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(if round == 0 { 500 } else { 2500 }));
        let mut m = fx
            .connect("mon1")
            .unwrap_or_else(|e| panic!("round {round}: the monitor was locked out: {e}"));
        assert_eq!(m.sensor_box().unwrap().sensors.len(), 4);
        assert_eq!(m.read(0x30_0000, 8).unwrap(), b"RAMBYTES");
    }
    stop.store(true, Ordering::SeqCst);
    for p in peers {
        p.join().unwrap();
    }
    let refused = fx.audit_events("refused");
    assert!(
        refused.iter().any(|e| e.to_string().contains("127.0.0.2")
            && e.to_string().contains("max_startups_per_source")),
        "{refused:?}"
    );
}

#[test]
fn a_monitor_without_the_lock_permission_is_denied_the_lock() {
    let fx = start("", "");
    let mut m2 = fx.connect("mon2").unwrap();
    let e = m2.lock(Duration::from_secs(1)).unwrap_err();
    assert_eq!(e.code(), Some(code::DENIED), "{e}");
    assert!(e.to_string().contains("lock = true"), "{e}");
    assert_eq!(fx.backend.pauses.load(Ordering::SeqCst), 0);
    // One with the permission gets it.
    let mut m1 = fx.connect("mon1").unwrap();
    m1.lock(Duration::from_secs(1)).unwrap();
    m1.unlock().unwrap();
    assert!(fx
        .audit_events("denied")
        .iter()
        .any(|e| e["op"] == "LOCK" && e["monitor"] == "mon2"));
}

#[test]
fn a_lease_above_the_maximum_is_refused() {
    let fx = start("", "");
    let mut m1 = fx.connect("mon1").unwrap();
    let e = m1.lock(Duration::from_millis(10_001)).unwrap_err();
    assert_eq!(e.code(), Some(code::BAD_REQUEST), "{e}");
    assert!(e.to_string().contains("max_lease_ms"), "{e}");
    assert_eq!(fx.backend.pauses.load(Ordering::SeqCst), 0);
    m1.lock(Duration::from_millis(10_000)).unwrap();
    m1.unlock().unwrap();
}

#[test]
fn a_holder_renewing_while_another_waits_is_refused_and_the_other_gets_the_lock() {
    let fx = start("", "[lock]\nmax_lease_ms = 400\n");
    let mut m1 = fx.connect("mon1").unwrap();
    m1.lock(Duration::from_millis(400)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // mon1 renews every 50 ms, for ever if it may.
    let renewer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let give_up = Instant::now() + Duration::from_secs(10);
            while !stop.load(Ordering::SeqCst) && Instant::now() < give_up {
                if let Err(e) = m1.lock(Duration::from_millis(400)) {
                    return Some(e);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            None
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let mut m3 = fx.connect("mon3").unwrap();
    let got = m3.lock(Duration::from_millis(400));
    stop.store(true, Ordering::SeqCst);
    let refused = renewer.join().unwrap();
    got.expect("the waiting monitor never got the lock");
    let e = refused.expect("the holder renewed for ever");
    assert_eq!(e.code(), Some(code::BUSY), "{e}");
    assert!(e.to_string().contains("waiting"), "{e}");
    m3.unlock().unwrap();
}

#[test]
fn a_monitor_cannot_keep_the_guest_paused_beyond_its_duty_cycle() {
    let fx = start(
        "",
        "[lock]\nmax_lease_ms = 500\nduty_window_ms = 60000\nmax_pause_per_window_ms = 2000\n",
    );
    let mut m1 = fx.connect("mon1").unwrap();
    let give_up = Instant::now() + Duration::from_secs(20);
    let e = loop {
        assert!(Instant::now() < give_up, "renewed without limit");
        match m1.lock(Duration::from_millis(500)) {
            Ok(_) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), Some(code::BUSY), "{e}");
    assert!(e.to_string().contains("max_pause_per_window_ms"), "{e}");
    // Another monitor has a budget of its own and gets the lock once the holder's lease ends.
    let mut m3 = fx.connect("mon3").unwrap();
    m3.lock(Duration::from_millis(500)).unwrap();
    m3.unlock().unwrap();
    assert!(fx
        .audit_events("lock_busy")
        .iter()
        .any(|e| e.to_string().contains("max_pause_per_window_ms")));
}

#[test]
fn a_write_needs_an_unexpired_lock() {
    let fx = start("", "");
    let mut m1 = fx.connect("mon1").unwrap();
    let slot = HOOKS + 64 + 5 * 32;
    let e = m1.write(slot, b"unlocked").unwrap_err();
    assert_eq!(e.code(), Some(code::NOT_LOCKED), "{e}");
    assert_eq!(fx.guest(slot, 8), [0; 8]);
    m1.lock(Duration::from_millis(300)).unwrap();
    m1.write(slot, b"locked!!").unwrap();
    assert_eq!(fx.guest(slot, 8), b"locked!!");
    std::thread::sleep(Duration::from_millis(400));
    let e = m1.write(slot, b"too late").unwrap_err();
    assert_eq!(e.code(), Some(code::NOT_LOCKED), "{e}");
    assert_eq!(fx.guest(slot, 8), b"locked!!");
    assert!(fx
        .audit_events("denied")
        .iter()
        .any(|e| e["op"] == "WRITE" && e.to_string().contains("not holding the lock")));
}

#[test]
fn a_second_monitors_post_is_refused_while_the_first_holds_the_lock() {
    let fx = start("", "");
    let m1 = BridgeMem::new(fx.connect("mon1").unwrap());
    let m3 = BridgeMem::new(fx.connect("mon3").unwrap());
    let sb = m1.bridge().sensor_box().unwrap();
    let mb = Mailbox::open(&m1, &sb).unwrap();
    m1.lock(Duration::from_secs(5)).unwrap();
    // mon3 posts a different request meanwhile, without the lock: nothing of it lands.
    let e = mb.post(&m3, KillTarget::Uid(1000), 9).unwrap_err();
    assert!(e.to_string().contains("LOCK"), "{e}");
    let slot = mb
        .post(
            &m1,
            KillTarget::Pid {
                pid: 1234,
                start_time: 5,
            },
            7,
        )
        .unwrap();
    m1.unlock().unwrap();
    assert_eq!(slot, 0);
    // Slot 0 holds mon1's request, whole; the doorbell rang once.
    let mut want = Vec::new();
    for v in [1u32, 1, 1234, 0] {
        want.extend(v.to_le_bytes());
    }
    want.extend(5u64.to_le_bytes());
    want.extend(7u64.to_le_bytes());
    assert_eq!(fx.guest(HOOKS + 64, 32), want);
    assert_eq!(fx.guest(HOOKS + 8, 8), 1u64.to_le_bytes());
}

#[test]
fn regs_needs_the_regs_permission_and_is_audited() {
    let fx = start("", "");
    let mut m2 = fx.connect("mon2").unwrap();
    let e = m2.regs(0).unwrap_err();
    assert_eq!(e.code(), Some(code::DENIED), "{e}");
    assert!(e.to_string().contains("regs = true"), "{e}");
    let mut m1 = fx.connect("mon1").unwrap();
    assert_eq!(m1.regs(0).unwrap().cr3, 0x1000);
    assert!(fx
        .audit_events("regs")
        .iter()
        .any(|e| e["monitor"] == "mon1"));
    // A loop of REGS runs into the per-session rate limit.
    let limited = (0..100).find_map(|_| m1.regs(0).err());
    let e = limited.expect("REGS was not rate-limited");
    assert_eq!(e.code(), Some(code::BUSY), "{e}");
}
