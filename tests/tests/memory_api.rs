//! Another process gets the guest's memfd through the API's memory hand-off and finds the kernel's
//! `linux_banner` at the guest-physical address that System.map and the kernel's load address
//! give. On the tcg engine that process is the test itself; on the kvm engine it is the bridge
//! inside the kvm host (the memfd cannot leave the host that runs the guest), which the test
//! reads through.

use std::time::Duration;

use backdoors_tests::site::Engine;
use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::{kernel_code_phys, Images};
use introspect::kernel::Symbols;
use introspect::mem::PhysMem;

fn banner_at_its_physical_address(engine: Engine, kernel_key: &str, map_key: &str) {
    let img = Images::load();
    let spec = VmSpec::on(
        engine,
        img.get(kernel_key),
        img.get("BD_INITRAMFS"),
        "bd.scenario=hello bd.halt=wait",
    );
    let mut vm = Vm::start(&spec);
    vm.expect("BACKDOORS: halt wait", Duration::from_secs(120));
    let out = vm.stdout();
    // KASLR moved the kernel; the guest says where its code starts physically.
    let code_start = kernel_code_phys(&out);
    let syms = Symbols::from_file(img.get(map_key)).unwrap();
    let phys = code_start + (syms.get("linux_banner").unwrap() - syms.get("_text").unwrap());

    let mem = vm.guest_mem();
    assert_eq!(mem.size(), 512 << 20);
    assert_eq!(mem.backdoor().0, 15 << 20);
    let mut bytes = vec![0u8; 256];
    mem.read(phys, &mut bytes)
        .expect("banner address inside guest RAM");
    let banner = String::from_utf8_lossy(&bytes);
    let banner = banner.split('\n').next().unwrap();
    assert!(
        banner.starts_with("Linux version 6.1."),
        "at {phys:#x}: {banner:?}"
    );
    // It is the very banner the kernel printed on the console at boot.
    assert!(
        out.contains(banner.trim_end()),
        "{banner:?} not on the console"
    );
}

#[test]
fn tcg_linux_banner_of_the_patched_kernel_is_where_system_map_says() {
    banner_at_its_physical_address(Engine::Tcg, "BD_KERNEL_BZIMAGE", "BD_KERNEL_SYSTEM_MAP");
}

#[test]
fn tcg_linux_banner_of_the_stock_kernel_is_where_system_map_says() {
    banner_at_its_physical_address(Engine::Tcg, "BD_STOCK_VMLINUZ", "BD_STOCK_SYSTEM_MAP");
}

#[test]
fn kvm_linux_banner_of_the_patched_kernel_is_where_system_map_says() {
    banner_at_its_physical_address(Engine::Kvm, "BD_KERNEL_BZIMAGE", "BD_KERNEL_SYSTEM_MAP");
}

#[test]
fn kvm_linux_banner_of_the_stock_kernel_is_where_system_map_says() {
    banner_at_its_physical_address(Engine::Kvm, "BD_STOCK_VMLINUZ", "BD_STOCK_SYSTEM_MAP");
}
