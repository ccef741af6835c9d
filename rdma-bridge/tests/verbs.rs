//! The verbs transport end to end on one RDMA device: a target and a monitor with two RC queue
//! pairs on the same device (loopback). Tests that need a device print why they skip and pass on
//! hosts without one (such as our development and CI machines, which have no RDMA kernel support).
#![cfg(feature = "verbs")]

use std::ptr::NonNull;

use rdma_bridge::verbs::{
    decode_connect, devices_available, encode_connect, Access, RegionInfo, RegionSpec, VerbsError,
    VerbsMonitor, VerbsTarget,
};

/// The RDMA devices, or `None` after printing why the test is skipped.
fn devices_or_skip(test: &str) -> Option<Vec<String>> {
    match devices_available() {
        Ok(devices) if !devices.is_empty() => Some(devices),
        Ok(_) => {
            eprintln!(
                "{test}: skipping: no RDMA device (ibverbs::devices() found none; this host has no \
                 RDMA kernel support)"
            );
            None
        }
        Err(e) => {
            eprintln!("{test}: skipping: cannot list RDMA devices: {e}");
            None
        }
    }
}

/// A shared mapping of a memfd, like bdvmm's guest memory. Unmapped on drop.
struct SharedMapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl SharedMapping {
    fn new(len: usize) -> Self {
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"verbs-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is the memfd just created.
        let rc = unsafe { libc::ftruncate(fd, libc::off_t::try_from(len).unwrap()) };
        assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh shared mapping of the whole memfd; checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the mapping keeps the memfd alive; the descriptor is no longer needed.
        unsafe { libc::close(fd) };
        SharedMapping {
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            len,
        }
    }

    fn fill(&self, f: impl Fn(usize) -> u8) {
        for i in 0..self.len {
            // SAFETY: `i` < len, inside the mapping; raw writes, no references are held.
            unsafe { self.ptr.as_ptr().add(i).write_volatile(f(i)) };
        }
    }

    fn get(&self, i: usize) -> u8 {
        assert!(i < self.len);
        // SAFETY: `i` < len, inside the mapping.
        unsafe { self.ptr.as_ptr().add(i).read_volatile() }
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `new` with this address and length.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

const RAM_GPA: u64 = 0x10_0000;
const RAM_LEN: usize = 1 << 20;
const HOOK_GPA: u64 = 0x40_0000;
const HOOK_LEN: usize = 4096;

fn specs(ram: &SharedMapping, hooks: &SharedMapping) -> Vec<RegionSpec> {
    vec![
        RegionSpec {
            name: "ram".to_owned(),
            gpa: RAM_GPA,
            host: ram.ptr,
            len: RAM_LEN,
            access: Access::RemoteRead,
        },
        RegionSpec {
            name: "hooks".to_owned(),
            gpa: HOOK_GPA,
            host: hooks.ptr,
            len: HOOK_LEN,
            access: Access::RemoteWrite,
        },
    ]
}

/// What a read-only monitor gets: the first page of RAM, as its "Sensor Box".
fn sb_spec(ram: &SharedMapping) -> Vec<RegionSpec> {
    vec![RegionSpec {
        name: "sb".to_owned(),
        gpa: RAM_GPA,
        host: ram.ptr,
        len: 4096,
        access: Access::RemoteRead,
    }]
}

/// A loopback test's device and guest memory: RAM filled with [`pattern`], the hooks zeroed.
/// Declare it before the test's [`VerbsTarget`], so that the mappings outlive the target.
struct Loopback {
    device: String,
    ram: SharedMapping,
    hooks: SharedMapping,
}

impl Loopback {
    /// The first RDMA device and fresh guest memory, or `None` after printing why `test` skips.
    fn or_skip(test: &str) -> Option<Loopback> {
        let device = devices_or_skip(test)?.into_iter().next()?;
        let ram = SharedMapping::new(RAM_LEN);
        ram.fill(pattern);
        let hooks = SharedMapping::new(HOOK_LEN);
        hooks.fill(|_| 0);
        Some(Loopback { device, ram, hooks })
    }
}

/// A monitor connected to `target` with `specs`; returns it and the target's QP number.
fn connect(
    target: &mut VerbsTarget,
    device: Option<&str>,
    specs: Vec<RegionSpec>,
) -> (VerbsMonitor, u32, Vec<RegionInfo>) {
    let mut monitor = VerbsMonitor::open(device).expect("open monitor");
    // SAFETY: the callers' mappings outlive `target` and are only accessed by volatile copies.
    let a = unsafe { target.accept(monitor.local_endpoint(), specs) }.expect("accept");
    monitor
        .connect(a.endpoint, a.regions.clone())
        .expect("connect");
    (monitor, a.endpoint.qp_num, a.regions)
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 8)).to_le_bytes()[0]
}

#[test]
fn open_without_a_device_says_so() {
    match devices_available() {
        Ok(devices) if devices.is_empty() => {
            let t = VerbsTarget::open(None);
            assert!(matches!(t, Err(VerbsError::NoDevice)), "{t:?}");
            let m = VerbsMonitor::open(None);
            assert!(matches!(m, Err(VerbsError::NoDevice)), "{m:?}");
            let msg = VerbsError::NoDevice.to_string();
            assert!(msg.contains("TCP transport"), "{msg}");
        }
        Ok(devices) => {
            // With devices, an unknown name is reported with the list of real ones.
            match VerbsTarget::open(Some("no-such-rdma-device")) {
                Err(VerbsError::DeviceNotFound { available, .. }) => {
                    assert!(devices.iter().all(|d| available.contains(d.as_str())))
                }
                other => panic!("expected DeviceNotFound, got {other:?}"),
            }
        }
        Err(e) => eprintln!("open_without_a_device_says_so: skipping: {e}"),
    }
}

#[test]
fn loopback_read_and_refused_write() {
    let Some(Loopback { device, ram, hooks }) =
        Loopback::or_skip("loopback_read_and_refused_write")
    else {
        return;
    };
    let device = Some(device.as_str());

    let mut target = VerbsTarget::open(device).expect("open target");
    // The exchange goes through the connect blob, as it does inside RDMA_CONNECT frames.
    let mut monitor = VerbsMonitor::open(device).expect("open monitor");
    let hello = encode_connect(&monitor.local_endpoint(), &[]).expect("encode hello");
    let (monitor_ep, none) = decode_connect(&hello).expect("decode hello");
    assert!(none.is_empty());
    // SAFETY: both mappings outlive `target` (declared before it, so dropped after it) and no
    // references into them are held; they are accessed only through volatile raw-pointer copies.
    let accepted = unsafe { target.accept(monitor_ep, specs(&ram, &hooks)) }.expect("accept");
    let reply = encode_connect(&accepted.endpoint, &accepted.regions).expect("encode reply");
    let (target_ep, table) = decode_connect(&reply).expect("decode reply");
    monitor.connect(target_ep, table).expect("connect");

    // One 4 KiB READ.
    let off = 8192;
    let got = monitor.read(RAM_GPA + off as u64, 4096).expect("read");
    let want: Vec<u8> = (off..off + 4096).map(pattern).collect();
    assert_eq!(got, want);

    // The whole region (as large as the monitor's bounce buffer) in one call.
    let got = monitor.read(RAM_GPA, RAM_LEN).expect("read all");
    assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i)));

    // Refused locally, before anything is posted: the connection stays usable afterwards.
    for (gpa, len) in [(RAM_GPA, 3usize), (RAM_GPA + RAM_LEN as u64 - 1, 2)] {
        match monitor.write(gpa, &vec![0xAA; len]) {
            Err(VerbsError::OutOfRegion {
                access: Access::RemoteWrite,
                ..
            }) => {}
            other => panic!("write to the read-only region was not refused: {other:?}"),
        }
    }
    match monitor.read(RAM_GPA + RAM_LEN as u64 - 8, 16) {
        Err(VerbsError::OutOfRegion { .. }) => {}
        other => panic!("read past the region was not refused: {other:?}"),
    }
    match monitor.read(HOOK_GPA, 8) {
        Err(VerbsError::OutOfRegion { .. }) => {}
        other => panic!("read of the write-only region was not refused: {other:?}"),
    }
    assert_eq!(ram.get(0), pattern(0), "guest memory changed");

    // A WRITE into the hook region lands in the target's mapping, zero copy, once the bridge has
    // opened the write window (it does while the monitor holds the lock).
    assert!(target
        .set_remote_write(target_ep.qp_num, true)
        .expect("open the write window"));
    monitor
        .write(HOOK_GPA + 16, &[1, 2, 3, 4])
        .expect("write hook");
    assert_eq!(
        (0..24).map(|i| hooks.get(i)).collect::<Vec<_>>(),
        [0u8; 16]
            .iter()
            .copied()
            .chain([1, 2, 3, 4, 0, 0, 0, 0])
            .collect::<Vec<_>>()
    );

    // Still connected after the refusals: a last read works.
    assert_eq!(monitor.read(RAM_GPA, 1).expect("read"), vec![pattern(0)]);

    // Release the monitor's queue pair on the target side.
    assert!(target.release(target_ep.qp_num));
    assert_eq!(target.monitors(), 0);
    drop(monitor);
    drop(target);
}

/// The isolation the bridge relies on, enforced by the target's NIC (ReDMArk's mitigations): each
/// monitor's queue pair lives in its own protection domain, so another monitor's rkey is refused;
/// REMOTE_WRITE exists only while the write window is open; a released queue pair is gone.
#[test]
fn loopback_isolation_between_monitors() {
    let Some(Loopback { device, ram, hooks }) =
        Loopback::or_skip("loopback_isolation_between_monitors")
    else {
        return;
    };
    let device = Some(device.as_str());
    let mut target = VerbsTarget::open(device).expect("open target");

    // "rw" gets RAM (read) and the hooks (write); "ro" gets only the first page of RAM.
    let (mut rw, rw_qp, rw_regions) = connect(&mut target, device, specs(&ram, &hooks));
    let (mut ro, _ro_qp, ro_regions) = connect(&mut target, device, sb_spec(&ram));
    assert_eq!(target.monitors(), 2);
    assert_eq!(
        ro.read(RAM_GPA, 16).expect("ro read"),
        (0..16).map(pattern).collect::<Vec<_>>()
    );
    assert!(!ro_regions.iter().any(|r| r.access == Access::RemoteWrite));

    // No write right until the window opens: the NIC refuses the WRITE (the monitor's QP breaks).
    let hook = rw_regions
        .iter()
        .find(|r| r.access == Access::RemoteWrite)
        .unwrap()
        .clone();
    assert!(
        rw.write(HOOK_GPA, &[9; 8]).is_err(),
        "write without the window"
    );
    assert_eq!(hooks.get(0), 0);
    assert!(target.release(rw_qp));
    let (mut rw, rw_qp, _) = connect(&mut target, device, specs(&ram, &hooks));
    assert!(target.set_remote_write(rw_qp, true).unwrap());
    rw.write(HOOK_GPA, &[7; 8])
        .expect("write inside the window");
    assert_eq!(hooks.get(7), 7);
    assert!(target.set_remote_write(rw_qp, false).unwrap());
    assert!(
        rw.write(HOOK_GPA, &[5; 8]).is_err(),
        "write after the window closed"
    );
    assert_eq!(hooks.get(0), 7);

    // ro cannot write with its own rkey, nor read RAM with rw's (another protection domain).
    let ram_region = rw_regions.iter().find(|r| r.name == "ram").unwrap();
    assert!(ro
        .read_raw(ram_region.remote_addr + 8192, ram_region.rkey, 64)
        .is_err());
    let (mut ro, ro_qp, ro_regions) = connect(&mut target, device, sb_spec(&ram));
    assert!(ro
        .write_raw(ro_regions[0].remote_addr, ro_regions[0].rkey, &[1; 8])
        .is_err());
    assert!(ro.write_raw(hook.remote_addr, hook.rkey, &[1; 8]).is_err());
    assert_eq!(ram.get(0), pattern(0));
    assert_eq!(hooks.get(0), 7);

    // A released queue pair answers nothing.
    let (mut gone, gone_qp, _) = connect(&mut target, device, specs(&ram, &hooks));
    gone.set_timeout(std::time::Duration::from_secs(3));
    assert!(gone.read(RAM_GPA, 8).is_ok());
    assert!(target.release(gone_qp));
    assert!(gone.read(RAM_GPA, 8).is_err(), "read on a released QP");
    assert!(target.release(ro_qp));
    assert!(target.release(rw_qp));
}
