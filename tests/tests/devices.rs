//! Disks and a network on both engines, given in a VM config file: the Debian root filesystem image boots from `/dev/vda`
//! (the kvm engine's virtio-mmio, the tcg engine's QEMU virtio-blk-pci), its redis-server answers
//! this machine over the guest's virtio-net (kvm: vhost-net on a tap inside the kvm host, routed
//! through it; tcg: QEMU's virtio-net-pci on a tap here), a read-only second disk cannot be
//! written, and a file written before a guest reboot is there after it, with the network back.
//! The kvm engine runs inside a kvm host that has the images as its own (copy-on-write) disks.

use std::path::Path;
use std::time::Duration;

use backdoors_tests::rootfs::{RootfsGuest, RootfsSpec};
use backdoors_tests::site::Engine;

const STEP: Duration = Duration::from_secs(240);
/// What the read-only disk starts with.
const RO_HEAD: &[u8; 16] = b"BDVMM_RO_DISK_01";

/// A 1 MiB image starting with [`RO_HEAD`].
fn ro_image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("ro.img");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..16].copy_from_slice(RO_HEAD);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn boots_from_disk_and_keeps_a_file_across_a_reboot(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let ro = ro_image(dir.path());
    let mut spec = RootfsSpec::new(engine, "bd.scenario=disk");
    spec.disks.push((ro.clone(), true));
    spec.extra = vec!["--on-reset".into(), "restart".into()];
    // The disks and the network come from a VM config file (`bdvmm run --config vm.toml`).
    spec.config_file = true;
    let mut g = RootfsGuest::start(&spec);
    g.vm.expect(&format!("BACKDOORS: net eth0 {}/24", g.ip()), STEP);
    g.vm.expect("BACKDOORS: service up", STEP);
    // The first boot stops in the scenario until this key is set: redis answered this machine.
    assert_eq!(g.redis(&["ping"]), "PONG", "{}", g.vm.diagnostics());
    // 200 kB each way: many full-size frames through the device's queues.
    let big: String = (0..200_000u32)
        .map(|i| char::from(b'a' + u8::try_from(i % 26).unwrap()))
        .collect();
    assert_eq!(g.redis_with_input(&["set", "big"], big.as_bytes()), "OK");
    assert_eq!(g.redis(&["get", "big"]), big);
    assert_eq!(g.redis(&["set", "bd:disk-go", "1"]), "OK");
    let vda = g.vm.expect_line("DISK vda size=", STEP);
    assert!(vda.contains("ro=0"), "{vda}");
    let vdb = g.vm.expect_line("DISK vdb size=", STEP);
    assert!(vdb.contains("size=2048 ro=1"), "{vdb}");
    let head = g.vm.expect_line("DISK vdb head=", STEP);
    assert!(
        head.contains("head=BDVMM_RO_DISK_01 write=refused"),
        "{head}\n{}",
        g.vm.diagnostics()
    );
    let wrote = g.vm.expect_line("DISK wrote ", STEP);
    let mark = wrote
        .split("DISK wrote ")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(mark.starts_with("boot-"), "{wrote}");
    // The reboot restarts the guest in place; the second boot finds the mark.
    let found = g.vm.expect_line("DISK found ", STEP);
    assert!(found.contains(&mark), "wrote {mark}, then {found}");
    // The network came back with the rebooted guest; then the guest powers off.
    assert_eq!(g.redis(&["ping"]), "PONG", "{}", g.vm.diagnostics());
    assert_eq!(g.redis(&["set", "bd:disk-go", "1"]), "OK");
    let status =
        g.vm.wait_exit(STEP)
            .unwrap_or_else(|| panic!("bdvmm did not exit\n{}", g.vm.diagnostics()));
    assert!(status.success(), "exit {status}\n{}", g.vm.diagnostics());
    if engine == Engine::Tcg {
        // The read-only image is untouched.
        let bytes = std::fs::read(&ro).unwrap();
        assert_eq!(&bytes[..16], RO_HEAD);
    }
}

#[test]
fn tcg_boots_from_disk_and_keeps_a_file_across_a_reboot() {
    boots_from_disk_and_keeps_a_file_across_a_reboot(Engine::Tcg);
}

#[test]
fn kvm_boots_from_disk_and_keeps_a_file_across_a_reboot() {
    boots_from_disk_and_keeps_a_file_across_a_reboot(Engine::Kvm);
}

/// The stock Debian kernel boots the same image: its boot initramfs loads virtio-mmio (found in
/// bdvmm's DSDT on kvm), virtio-pci (QEMU on tcg), virtio-blk and virtio-net, then hands over.
fn the_stock_kernel_boots_from_disk_with_a_network(engine: Engine) {
    let mut spec = RootfsSpec::new(engine, "");
    spec.stock = true;
    let mut g = RootfsGuest::start(&spec);
    g.vm.expect("BOOTINITRD: root", STEP);
    g.vm.expect(&format!("BACKDOORS: net eth0 {}/24", g.ip()), STEP);
    g.vm.expect("BACKDOORS: service up", STEP);
    assert_eq!(g.redis(&["ping"]), "PONG", "{}", g.vm.diagnostics());
}

#[test]
fn tcg_the_stock_kernel_boots_from_disk_with_a_network() {
    the_stock_kernel_boots_from_disk_with_a_network(Engine::Tcg);
}

#[test]
fn kvm_the_stock_kernel_boots_from_disk_with_a_network() {
    the_stock_kernel_boots_from_disk_with_a_network(Engine::Kvm);
}
