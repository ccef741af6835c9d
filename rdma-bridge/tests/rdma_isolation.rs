//! The bridge's RDMA policy end to end over real TLS sessions, with the device replaced by a fake
//! ([`rdma_bridge::rdma::Nic`]), so it runs on hosts without RDMA (the real device runs it in the
//! SoftRoCE test, `bd-verbs-check`): each monitor's connection gets exactly its own grant, at most
//! two queue pairs per monitor, the write right only while that monitor holds the lock (closed on
//! UNLOCK and when the lease runs out), and the queue pair is released when the TLS session ends.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Config, Monitor, Scratch, BACKDOOR};
use rdma_bridge::backend::DumpBackend;
use rdma_bridge::client::Bridge;
use rdma_bridge::rdma::{Nic, PlannedRegion, RdmaError};
use rdma_bridge::verbs::{
    decode_connect, encode_connect, Access, Endpoint, RegionInfo, VerbsError,
};
use rdma_bridge::wire::code;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Accept(u32, Vec<(u64, u64, Access)>),
    Write(u32, bool),
    Release(u32),
}

#[derive(Default)]
struct Log {
    calls: Vec<Call>,
    next: u32,
}

struct FakeNic(Arc<Mutex<Log>>);

impl Nic for FakeNic {
    fn accept(
        &mut self,
        _remote: Endpoint,
        regions: &[PlannedRegion],
    ) -> Result<(Endpoint, Vec<RegionInfo>), RdmaError> {
        let mut l = self.0.lock().unwrap();
        l.next += 1;
        let qp = 0x100 + l.next;
        l.calls.push(Call::Accept(
            qp,
            regions.iter().map(|r| (r.gpa, r.len, r.access)).collect(),
        ));
        let infos = regions
            .iter()
            .map(|r| RegionInfo {
                name: r.name.clone(),
                gpa: r.gpa,
                len: r.len,
                remote_addr: 0x7f00_0000_0000 + r.gpa,
                rkey: qp,
                access: r.access,
            })
            .collect();
        Ok((endpoint(qp), infos))
    }
    fn set_remote_write(&mut self, qp_num: u32, on: bool) -> Result<bool, VerbsError> {
        self.0.lock().unwrap().calls.push(Call::Write(qp_num, on));
        Ok(true)
    }
    fn release(&mut self, qp_num: u32) -> bool {
        self.0.lock().unwrap().calls.push(Call::Release(qp_num));
        true
    }
}

fn endpoint(qp_num: u32) -> Endpoint {
    Endpoint {
        qp_num,
        psn: 1,
        lid: 3,
        mtu: 3,
        gid: None,
    }
}

struct Fixture {
    bridge: common::Fixture<DumpBackend>,
    nic: Arc<Mutex<Log>>,
}

/// A bridge serving a dump of zeros through the fake device: `rw` may read the Sensor Box and RAM,
/// lock and write the hooks; `ro` may only fetch the Sensor Box.
fn start() -> Fixture {
    let scratch = Scratch::new(&["rw", "ro"]);
    let backend = Arc::new(scratch.dump(&vec![0u8; common::RAM_SIZE], false));
    let config = Config {
        audit_log: "audit.jsonl",
        top: "",
        monitors: &[Monitor::healer("rw", false), Monitor::sb_only("ro")],
        tables: "",
    };
    let nic = Arc::new(Mutex::new(Log::default()));
    let bridge = scratch.serve(&config, backend, |server, cfg| {
        server
            .use_rdma_nic(Box::new(FakeNic(nic.clone())), cfg.agreement.k)
            .unwrap();
    });
    Fixture { bridge, nic }
}

impl Fixture {
    fn connect(&self, name: &str) -> Bridge {
        self.bridge.connect(name).unwrap()
    }
    fn calls(&self) -> Vec<Call> {
        self.nic.lock().unwrap().calls.clone()
    }
    /// Waits (bounded) until the fake device has seen `call`.
    fn wait_call(&self, call: Call) {
        let give_up = Instant::now() + Duration::from_secs(10);
        while !self.calls().contains(&call) {
            assert!(
                Instant::now() < give_up,
                "the device never saw {call:?}: {:?}",
                self.calls()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    fn wait_audit(&self, event: &str, needle: &str) {
        self.bridge.wait_audit(event, needle);
    }
}

/// RDMA_CONNECT on `b`; the region table and the bridge's QP number.
fn rdma_connect(
    b: &mut Bridge,
) -> Result<(u32, Vec<RegionInfo>), rdma_bridge::client::ClientError> {
    let blob = encode_connect(&endpoint(0x42), &[]).unwrap();
    let reply = b.rdma_connect(blob)?;
    let (ep, regions) = decode_connect(&reply).unwrap();
    Ok((ep.qp_num, regions))
}

#[test]
fn each_monitor_connection_gets_only_its_own_grant() {
    let fx = start();
    let mut rw = fx.connect("rw");
    let mut ro = fx.connect("ro");
    let (_, rw_regions) = rdma_connect(&mut rw).unwrap();
    let (ro_qp, ro_regions) = rdma_connect(&mut ro).unwrap();
    // ro: the Sensor Box, read only. Nothing of rw's RAM or hooks.
    assert_eq!(ro_regions.len(), 1, "{ro_regions:?}");
    assert_eq!(ro_regions[0].gpa, BACKDOOR);
    assert_eq!(ro_regions[0].len, 16 << 10);
    assert_eq!(ro_regions[0].access, Access::RemoteRead);
    assert!(fx.calls().contains(&Call::Accept(
        ro_qp,
        vec![(BACKDOOR, 16 << 10, Access::RemoteRead)]
    )));
    // rw: the Sensor Box and RAM to read, the hooks to write.
    let writes: Vec<_> = rw_regions
        .iter()
        .filter(|r| r.access == Access::RemoteWrite)
        .map(|r| (r.gpa, r.len))
        .collect();
    assert_eq!(writes, [(BACKDOOR + 0x2000, 0x840)]);
    // Nobody may write before taking the lock.
    assert!(!fx.calls().iter().any(|c| matches!(c, Call::Write(_, true))));
    fx.wait_audit("rdma_connected", "\"monitor\":\"ro\"");
}

#[test]
fn rdma_write_is_open_only_while_the_lock_is_held() {
    let fx = start();
    let mut rw = fx.connect("rw");
    let (qp, _) = rdma_connect(&mut rw).unwrap();
    rw.lock(Duration::from_secs(5)).unwrap();
    fx.wait_call(Call::Write(qp, true));
    rw.unlock().unwrap();
    fx.wait_call(Call::Write(qp, false));
    fx.wait_audit("rdma_write_closed", "unlock");
    // A holder that never unlocks loses the right when the lease runs out.
    let n = fx.calls().len();
    rw.lock(Duration::from_millis(200)).unwrap();
    let give_up = Instant::now() + Duration::from_secs(10);
    while !fx.calls()[n..].contains(&Call::Write(qp, false)) {
        assert!(Instant::now() < give_up, "{:?}", fx.calls());
        std::thread::sleep(Duration::from_millis(10));
    }
    fx.wait_audit("rdma_write_closed", "lease expired");
    // Connecting (again) while holding the lock opens the window on the new queue pair.
    rw.lock(Duration::from_secs(5)).unwrap();
    let (qp2, _) = rdma_connect(&mut rw).unwrap();
    assert!(
        fx.calls().contains(&Call::Release(qp)),
        "replaced QP not released"
    );
    fx.wait_call(Call::Write(qp2, true));
}

#[test]
fn closing_the_session_releases_its_queue_pair() {
    let fx = start();
    let mut rw = fx.connect("rw");
    let (qp, _) = rdma_connect(&mut rw).unwrap();
    rw.lock(Duration::from_secs(5)).unwrap();
    drop(rw);
    fx.wait_call(Call::Release(qp));
    fx.wait_audit("rdma_released", "session ended");
    let c = fx.calls();
    let closed = c.iter().position(|x| *x == Call::Write(qp, false));
    let released = c.iter().position(|x| *x == Call::Release(qp));
    assert!(closed < released, "{c:?}");
}

#[test]
fn a_monitor_gets_at_most_two_queue_pairs() {
    let fx = start();
    let mut a = fx.connect("rw");
    let mut b = fx.connect("rw");
    let mut c = fx.connect("rw");
    rdma_connect(&mut a).unwrap();
    let (qp_b, _) = rdma_connect(&mut b).unwrap();
    let e = rdma_connect(&mut c).unwrap_err();
    assert_eq!(e.code(), Some(code::BUSY), "{e}");
    fx.wait_audit("rdma_refused", "\"monitor\":\"rw\"");
    // Reconnecting on a session replaces its queue pair; it does not count twice.
    rdma_connect(&mut b).unwrap();
    fx.wait_call(Call::Release(qp_b));
    // The quota is per monitor: ro is not affected.
    let mut ro = fx.connect("ro");
    rdma_connect(&mut ro).unwrap();
    // Ending a session frees one slot.
    drop(a);
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        match rdma_connect(&mut c) {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < give_up, "{e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
