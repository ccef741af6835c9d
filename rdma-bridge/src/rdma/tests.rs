//! The glue's policy on a fake device: which regions a monitor gets, the queue-pair caps, the
//! write window and release with the session.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::verbs::{decode_connect, encode_connect};

/// What the fake device was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Accept(u32, Vec<PlannedRegion>),
    Write(u32, bool),
    Release(u32),
}

#[derive(Default)]
struct Log {
    calls: Vec<Call>,
    live: Vec<u32>,
    next_qp: u32,
    audit: Vec<(String, serde_json::Value)>,
}

struct FakeNic(Arc<Mutex<Log>>);

impl Nic for FakeNic {
    fn accept(
        &mut self,
        _remote: Endpoint,
        regions: &[PlannedRegion],
    ) -> Result<(Endpoint, Vec<RegionInfo>), RdmaError> {
        let mut l = self.0.lock().unwrap();
        l.next_qp += 1;
        let qp = 100 + l.next_qp;
        l.calls.push(Call::Accept(qp, regions.to_vec()));
        l.live.push(qp);
        let infos = regions
            .iter()
            .enumerate()
            .map(|(i, r)| RegionInfo {
                name: r.name.clone(),
                gpa: r.gpa,
                len: r.len,
                remote_addr: 0x7f00_0000_0000 + r.gpa,
                rkey: qp * 1000 + u32::try_from(i).unwrap(),
                access: r.access,
            })
            .collect();
        Ok((endpoint(qp), infos))
    }

    fn set_remote_write(&mut self, qp_num: u32, on: bool) -> Result<bool, VerbsError> {
        let mut l = self.0.lock().unwrap();
        l.calls.push(Call::Write(qp_num, on));
        Ok(l.live.contains(&qp_num))
    }

    fn release(&mut self, qp_num: u32) -> bool {
        let mut l = self.0.lock().unwrap();
        l.calls.push(Call::Release(qp_num));
        let before = l.live.len();
        l.live.retain(|q| *q != qp_num);
        before != l.live.len()
    }
}

fn endpoint(qp_num: u32) -> Endpoint {
    Endpoint {
        qp_num,
        psn: 7,
        lid: 1,
        mtu: 3,
        gid: None,
    }
}

fn hello() -> Vec<u8> {
    encode_connect(&endpoint(0x42), &[]).unwrap()
}

fn rw() -> Grant {
    Grant {
        read: vec![(0x10_0000, 0x4000), (0, 0x40_0000)],
        write: vec![(0x10_2000, 0x840)],
        restart: false,
        lock: true,
        regs: false,
    }
}

fn ro() -> Grant {
    Grant {
        read: vec![(0x10_0000, 0x4000)],
        write: vec![],
        restart: false,
        lock: false,
        regs: false,
    }
}

fn glue(k: usize) -> (RdmaGlue, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let l2 = log.clone();
    let audit: AuditSink = Arc::new(move |event: &str, fields: serde_json::Value| {
        l2.lock().unwrap().audit.push((event.to_owned(), fields));
        Ok(())
    });
    let g = RdmaGlue::new(Box::new(FakeNic(log.clone())), k, audit).unwrap();
    (g, log)
}

fn calls(log: &Arc<Mutex<Log>>) -> Vec<Call> {
    log.lock().unwrap().calls.clone()
}

fn audited(log: &Arc<Mutex<Log>>, event: &str) -> Vec<serde_json::Value> {
    log.lock()
        .unwrap()
        .audit
        .iter()
        .filter(|(e, _)| e == event)
        .map(|(_, f)| f.clone())
        .collect()
}

#[test]
fn each_monitor_gets_exactly_its_own_grant() {
    let (g, log) = glue(1);
    let reply = g.connect(1, "rw", &rw(), &hello(), None).unwrap();
    let (_, table) = decode_connect(&reply).unwrap();
    g.connect(2, "ro", &ro(), &hello(), None).unwrap();
    let c = calls(&log);
    // The read-only monitor's connection holds its one read range and nothing of rw's grant.
    assert_eq!(
        c[1],
        Call::Accept(
            102,
            vec![PlannedRegion {
                name: "read-0".into(),
                gpa: 0x10_0000,
                len: 0x4000,
                access: Access::RemoteRead
            }]
        )
    );
    let Call::Accept(_, rw_regions) = &c[0] else {
        panic!("{c:?}")
    };
    assert_eq!(rw_regions.len(), 3);
    assert_eq!(
        rw_regions
            .iter()
            .filter(|r| r.access == Access::RemoteWrite)
            .map(|r| (r.gpa, r.len))
            .collect::<Vec<_>>(),
        [(0x10_2000, 0x840)]
    );
    assert_eq!(table.len(), 3);
    // No connection starts with the write right.
    assert!(
        !c.iter().any(|c| matches!(c, Call::Write(_, true))),
        "{c:?}"
    );
    // The audit log has what was registered.
    let connected = audited(&log, "rdma_connected");
    assert_eq!(connected.len(), 2);
    assert_eq!(connected[1]["monitor"], "ro");
    assert_eq!(connected[1]["regions"][0]["access"], "read");
    assert_eq!(connected[1]["regions"].as_array().unwrap().len(), 1);
}

#[test]
fn with_k_of_n_no_write_region_is_registered() {
    let plan = plan_regions(&rw(), 2);
    assert!(
        plan.iter().all(|r| r.access == Access::RemoteRead),
        "{plan:?}"
    );
    assert_eq!(plan.len(), 2);
    let (g, log) = glue(2);
    g.connect(1, "rw", &rw(), &hello(), None).unwrap();
    // Even under the lock: no write region, no write right.
    g.lock_held(1, Instant::now() + Duration::from_secs(60));
    assert!(!calls(&log).iter().any(|c| matches!(c, Call::Write(..))));
}

#[test]
fn queue_pairs_are_capped_per_monitor_and_replaced_per_session() {
    let (g, log) = glue(1);
    g.connect(1, "rw", &rw(), &hello(), None).unwrap();
    g.connect(2, "rw", &rw(), &hello(), None).unwrap();
    let e = g.connect(3, "rw", &rw(), &hello(), None).unwrap_err();
    assert!(matches!(e, RdmaError::Quota { .. }), "{e}");
    assert!(e.to_string().contains("end one of its sessions"), "{e}");
    assert_eq!(audited(&log, "rdma_refused").len(), 1);
    // Another monitor is not affected by rw's quota.
    g.connect(4, "ro", &ro(), &hello(), None).unwrap();
    // A second RDMA_CONNECT on a session replaces its queue pair instead of adding one.
    g.connect(2, "rw", &rw(), &hello(), None).unwrap();
    assert_eq!(g.connections(), 3);
    assert!(calls(&log).contains(&Call::Release(102)));
    assert_eq!(log.lock().unwrap().live, vec![101, 103, 104]);
    // Ending a session frees its slot.
    g.end_session(1);
    g.connect(3, "rw", &rw(), &hello(), None).unwrap();
    assert_eq!(g.connections(), 3);
}

#[test]
fn session_end_releases_the_queue_pair() {
    let (g, log) = glue(1);
    g.connect(7, "rw", &rw(), &hello(), None).unwrap();
    g.lock_held(7, Instant::now() + Duration::from_secs(60));
    g.end_session(7);
    let c = calls(&log);
    assert_eq!(
        &c[1..],
        [
            Call::Write(101, true),
            Call::Write(101, false),
            Call::Release(101)
        ]
    );
    assert!(log.lock().unwrap().live.is_empty());
    assert_eq!(g.connections(), 0);
    let rel = audited(&log, "rdma_released");
    assert_eq!(rel.len(), 1);
    assert_eq!(rel[0]["reason"], "session ended");
    // Ending a session without RDMA does nothing.
    g.end_session(8);
    assert_eq!(calls(&log).len(), 4);
}

#[test]
fn writing_is_allowed_only_while_the_lock_is_held() {
    let (g, log) = glue(1);
    g.connect(1, "rw", &rw(), &hello(), None).unwrap();
    g.connect(2, "ro", &ro(), &hello(), None).unwrap();
    g.lock_held(1, Instant::now() + Duration::from_secs(60));
    // A renewal keeps the window open without another modify.
    g.lock_held(1, Instant::now() + Duration::from_secs(90));
    // A monitor without a write region never gets the right, lock or not.
    g.lock_held(2, Instant::now() + Duration::from_secs(60));
    g.lock_ended(1, "unlock");
    g.lock_ended(1, "unlock");
    assert_eq!(
        &calls(&log)[2..],
        [Call::Write(101, true), Call::Write(101, false)]
    );
    assert_eq!(audited(&log, "rdma_write_open").len(), 1);
    assert_eq!(audited(&log, "rdma_write_closed")[0]["reason"], "unlock");
    // Connecting while holding the lock opens the window at once.
    g.connect(
        1,
        "rw",
        &rw(),
        &hello(),
        Some(Instant::now() + Duration::from_secs(60)),
    )
    .unwrap();
    let c = calls(&log);
    assert_eq!(&c[c.len() - 1..], [Call::Write(103, true)]);
}

#[test]
fn the_write_window_closes_when_the_lease_runs_out() {
    let (g, log) = glue(1);
    g.connect(1, "rw", &rw(), &hello(), None).unwrap();
    // The holder never sends UNLOCK: the timer closes the window at the deadline.
    g.lock_held(1, Instant::now() + Duration::from_millis(50));
    let give_up = Instant::now() + Duration::from_secs(10);
    while !calls(&log).contains(&Call::Write(101, false)) {
        assert!(
            Instant::now() < give_up,
            "window still open: {:?}",
            calls(&log)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        audited(&log, "rdma_write_closed")[0]["reason"],
        "lease expired"
    );
}

#[test]
fn a_bad_blob_is_refused_without_touching_the_device() {
    let (g, log) = glue(1);
    assert!(g.connect(1, "rw", &rw(), &[0; 40], None).is_err());
    assert!(calls(&log).is_empty());
}

#[test]
fn nothing_is_granted_that_the_audit_log_cannot_record() {
    let log = Arc::new(Mutex::new(Log::default()));
    let fail = Arc::new(Mutex::new(false));
    let f2 = fail.clone();
    let audit: AuditSink = Arc::new(move |event: &str, _fields: serde_json::Value| {
        if *f2.lock().unwrap() {
            Err(crate::audit::AuditError::Append {
                path: "audit.jsonl".into(),
                source: std::io::Error::other(format!("disk full ({event})")),
            })
        } else {
            Ok(())
        }
    });
    let g = RdmaGlue::new(Box::new(FakeNic(log.clone())), 1, audit).unwrap();
    // The registration cannot be recorded: it is undone and the monitor told why.
    *fail.lock().unwrap() = true;
    let e = g.connect(1, "rw", &rw(), &hello(), None).unwrap_err();
    assert!(matches!(e, RdmaError::Unrecorded { .. }), "{e}");
    assert!(log.lock().unwrap().live.is_empty());
    assert_eq!(g.connections(), 0);
    // A connection recorded while the log worked gets no write window the log cannot hold.
    *fail.lock().unwrap() = false;
    g.connect(1, "rw", &rw(), &hello(), None).unwrap();
    *fail.lock().unwrap() = true;
    g.lock_held(1, Instant::now() + Duration::from_secs(60));
    assert!(!calls(&log)
        .iter()
        .any(|c| matches!(c, Call::Write(_, true))));
}
