//! Round trips through the process's State Box region, read back as a monitor would (with
//! `statebox::abi` on `as_bytes()`). One region per process: the tests take a lock.
#![cfg(target_os = "linux")]

use std::sync::{Mutex, MutexGuard};

use statebox::abi::{self, parse_region, parse_slot, STATEBOX_VA};
use statebox::{Region, RegionError};

static ONE_REGION: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    ONE_REGION.lock().unwrap_or_else(|e| e.into_inner())
}

fn slot_bytes(r: &Region, slot: u32) -> &[u8] {
    r.header().slot_bytes(r.as_bytes(), slot).unwrap()
}

#[test]
fn create_export_import_delete_find() {
    let _g = lock();
    let mut r = Region::create(8, 256).unwrap();
    assert_eq!(r.as_bytes().as_ptr() as u64, STATEBOX_VA);
    let h = r.header();
    assert_eq!(h.slot_count, 8);
    assert_eq!(h.capacity, 256);
    assert_ne!(h.region_generation, 0);
    assert_eq!(abi::Header::parse(r.as_bytes()).unwrap(), h);

    let a = r.create_box(1001).unwrap();
    let b = r.create_box(1002).unwrap();
    assert_ne!(a.slot, b.slot);
    assert_ne!(a.generation, b.generation);
    assert_eq!(r.find(1001), Some(a));
    assert_eq!(r.find(7), None);
    assert_eq!(r.boxes(), vec![a, b]);

    let mut out = vec![9u8; 3];
    r.import(&a, &mut out).unwrap();
    assert!(out.is_empty(), "a new box is empty");
    r.export(&a, b"alice: 3 bids").unwrap();
    r.export(&b, &[7u8; 256]).unwrap();
    r.import(&a, &mut out).unwrap();
    assert_eq!(out, b"alice: 3 bids");
    r.import(&b, &mut out).unwrap();
    assert_eq!(out, [7u8; 256]);

    let snap = parse_region(r.as_bytes()).unwrap();
    assert!(snap.bad.is_empty());
    assert_eq!(snap.boxes.len(), 2);
    assert_eq!(snap.boxes[0].id, 1001);
    assert_eq!(snap.boxes[0].data, b"alice: 3 bids");

    r.delete(a).unwrap();
    assert_eq!(r.find(1001), None);
    assert!(matches!(r.export(&a, b"x"), Err(RegionError::Stale { .. })));
    assert!(matches!(
        r.import(&a, &mut out),
        Err(RegionError::Stale { .. })
    ));
    assert!(matches!(r.delete(a), Err(RegionError::Stale { .. })));
    assert_eq!(parse_slot(&h, a.slot, slot_bytes(&r, a.slot)), Ok(None));

    // The slot is reused with a new generation; the old handle stays stale.
    let c = r.create_box(1003).unwrap();
    assert_eq!(c.slot, a.slot);
    assert_ne!(c.generation, a.generation);
    assert!(matches!(r.export(&a, b"x"), Err(RegionError::Stale { .. })));
    assert_eq!(
        r.header().next_generation,
        abi::Header::parse(r.as_bytes()).unwrap().next_generation
    );
}

#[test]
fn refusals() {
    let _g = lock();
    let mut r = Region::create(2, 16).unwrap();
    assert!(matches!(r.create_box(0), Err(RegionError::ZeroId)));
    let a = r.create_box(5).unwrap();
    assert!(matches!(
        r.create_box(5),
        Err(RegionError::IdExists { id: 5 })
    ));
    r.create_box(6).unwrap();
    assert!(matches!(
        r.create_box(7),
        Err(RegionError::Full { slot_count: 2 })
    ));
    assert!(matches!(
        r.export(&a, &[0u8; 17]),
        Err(RegionError::Abi(abi::AbiError::DataTooLarge {
            len: 17,
            capacity: 16
        }))
    ));
    let mut out = Vec::new();
    r.import(&a, &mut out).unwrap();
    assert!(out.is_empty(), "a refused export changes nothing");
    let forged = statebox::BoxHandle {
        generation: a.generation + 100,
        ..a
    };
    assert!(matches!(
        r.export(&forged, b"x"),
        Err(RegionError::Stale { .. })
    ));

    // One region per process.
    assert!(matches!(
        Region::create(1, 8),
        Err(RegionError::AlreadyOpen)
    ));
    drop(r);
    // Gone after drop: a new one can be made.
    let r = Region::create(1, 8).unwrap();
    assert_eq!(r.boxes(), vec![]);
    drop(r);
    assert!(matches!(
        Region::create(0, 8),
        Err(RegionError::Abi(abi::AbiError::BadGeometry(_)))
    ));
}

#[test]
fn the_previous_copy_stays_whole_in_the_inactive_copy() {
    let _g = lock();
    let mut r = Region::create(1, 64).unwrap();
    let h = r.header();
    let b = r.create_box(42).unwrap();
    let seq0 = abi::slot_seq(slot_bytes(&r, 0)).unwrap();
    r.export(&b, b"first").unwrap();
    r.export(&b, b"second").unwrap();
    let s = slot_bytes(&r, 0);
    let seq = abi::slot_seq(s).unwrap();
    assert_eq!(seq, seq0 + 4);
    let latest = parse_slot(&h, 0, s).unwrap().unwrap();
    assert_eq!(latest.data, b"second");
    assert_eq!(latest.seq, seq);
    // Pretend a reader saw seq before the last publish: the other copy is the previous state.
    let mut older = s.to_vec();
    older[..8].copy_from_slice(&(seq - 2).to_le_bytes());
    let prev = parse_slot(&h, 0, &older).unwrap().unwrap();
    assert_eq!((prev.id, prev.generation), (42, b.generation));
    assert_eq!(prev.data, b"first");
}

#[test]
fn a_forked_child_has_no_mapping() {
    let _g = lock();
    let mut r = Region::create(1, 8).unwrap();
    let b = r.create_box(1).unwrap();
    r.export(&b, b"parent").unwrap();
    let page = usize::try_from(STATEBOX_VA).unwrap() as *mut libc::c_void;
    // SAFETY: the child only calls async-signal-safe syscalls (mincore, _exit).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let mut vec = [0u8; 1];
        // SAFETY: mincore only reports on the range; ENOMEM if it is not mapped.
        let rc = unsafe { libc::mincore(page, 4096, vec.as_mut_ptr()) };
        let unmapped =
            rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOMEM);
        // SAFETY: exit the child at once, without running the parent's destructors.
        unsafe { libc::_exit(if unmapped { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid);
    assert!(libc::WIFEXITED(status));
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the child still sees the region"
    );
    // The parent still has it.
    let mut out = Vec::new();
    r.import(&b, &mut out).unwrap();
    assert_eq!(out, b"parent");
}

#[test]
fn many_boxes_round_trip() {
    let _g = lock();
    let mut r = Region::create(200, 1024).unwrap();
    let mut handles = Vec::new();
    for id in 1..=200u64 {
        let b = r.create_box(id).unwrap();
        let data: Vec<u8> = (0..(id * 5) % 1025)
            .map(|i| (i ^ id).to_le_bytes()[0])
            .collect();
        r.export(&b, &data).unwrap();
        handles.push((b, data));
    }
    for (b, data) in handles.iter().step_by(3) {
        r.delete(*b).unwrap();
        assert!(r.find(b.id).is_none(), "{data:?}");
    }
    let snap = parse_region(r.as_bytes()).unwrap();
    assert!(snap.bad.is_empty());
    let mut out = Vec::new();
    let mut expected = 0;
    for (i, (b, data)) in handles.iter().enumerate() {
        if i % 3 == 0 {
            continue;
        }
        expected += 1;
        r.import(b, &mut out).unwrap();
        assert_eq!(&out, data);
        let seen = snap.boxes.iter().find(|c| c.id == b.id).unwrap();
        assert_eq!(&seen.data, data);
        assert_eq!(seen.slot, b.slot);
    }
    assert_eq!(snap.boxes.len(), expected);
    assert_eq!(r.boxes().len(), expected);
}
