//! Real guests boot under bdvmm: both kernels on tcg to /init, a scenario, and a clean exit on
//! poweroff; the real 6.1 kernel on this host's KVM far enough to print its banner and the exact
//! command line bdvmm passed.

use std::time::Duration;

use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::Images;

fn boot_hello_and_power_off(kernel_key: &str) {
    let img = Images::load();
    let spec = VmSpec::tcg(
        img.get(kernel_key),
        img.get("BD_INITRAMFS"),
        "bd.scenario=hello",
    );
    let mut vm = Vm::start(&spec);
    vm.expect("BACKDOORS: ready", Duration::from_secs(60));
    vm.expect("BACKDOORS: scenario hello started", Duration::from_secs(30));
    vm.expect(
        "BACKDOORS: scenario hello finished rc=0",
        Duration::from_secs(30),
    );
    vm.expect("BACKDOORS: poweroff", Duration::from_secs(30));
    let status = vm
        .wait_exit(Duration::from_secs(30))
        .expect("bdvmm did not exit after the guest powered off");
    assert!(
        status.success(),
        "exit {status}; bdvmm said:\n{}",
        vm.stderr()
    );
    assert!(
        vm.stderr()
            .contains("bdvmm: guest stopped: guest powered off"),
        "expected an ACPI poweroff, bdvmm said:\n{}",
        vm.stderr()
    );
    let out = vm.stdout();
    assert!(out.contains("HELLO from 6.1."), "{out}");
    // The backdoor range is reserved in the map the guest uses.
    assert!(
        out.contains("backdoor.sb=0xf00000,0x100000"),
        "cmdline not passed:\n{out}"
    );
}

#[test]
fn tcg_boots_the_patched_kernel_runs_a_scenario_and_powers_off() {
    boot_hello_and_power_off("BD_KERNEL_BZIMAGE");
}

#[test]
fn tcg_boots_the_stock_debian_kernel_runs_a_scenario_and_powers_off() {
    boot_hello_and_power_off("BD_STOCK_VMLINUZ");
}

#[test]
fn tcg_guest_panic_ends_bdvmm_with_a_reason() {
    let img = Images::load();
    // An init that does not exist: the kernel panics ("No working init found").
    let spec = VmSpec::tcg(
        img.get("BD_KERNEL_BZIMAGE"),
        img.get("BD_INITRAMFS"),
        "rdinit=/nonexistent init=/nonexistent",
    );
    let mut vm = Vm::start(&spec);
    let status = vm
        .wait_exit(Duration::from_secs(60))
        .expect("bdvmm did not exit after a guest panic");
    assert_eq!(status.code(), Some(1), "{}", vm.stderr());
    let last = vm.stderr().lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("bdvmm: error: guest kernel panic: Kernel panic - not syncing"),
        "{last}"
    );
}

#[test]
fn kvm_boots_the_real_kernel_to_its_banner_and_command_line() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: no /dev/kvm on this host");
        return;
    }
    let img = Images::load();
    let cmdline = "console=ttyS0 earlyprintk=serial reboot=k panic=-1";
    let spec = VmSpec {
        kernel: img.get("BD_KERNEL_VMLINUX").to_path_buf(),
        initrd: Some(img.get("BD_INITRAMFS").to_path_buf()),
        cmdline: cmdline.into(),
        engine: "kvm".into(),
        mem: 256,
        vcpus: 1,
        extra: Vec::new(),
        netns: None,
    };
    let mut vm = Vm::start(&spec);
    vm.expect("Linux version 6.1.", Duration::from_secs(60));
    // bdvmm prints the command line it passed; the kernel must echo exactly that.
    let passed = vm
        .stderr()
        .lines()
        .find_map(|l| l.strip_prefix("bdvmm: cmdline: ").map(str::to_string))
        .expect("bdvmm prints its command line");
    assert!(passed.starts_with(cmdline) && passed.contains("backdoor.sb="));
    vm.expect(&format!("Command line: {passed}"), Duration::from_secs(60));
    let echoed = vm
        .stdout()
        .lines()
        .find_map(|l| {
            l.split_once("Command line: ")
                .map(|(_, c)| c.trim_end_matches('\r').to_string())
        })
        .unwrap();
    assert_eq!(echoed, passed, "the kernel saw a different command line");
    // The e820 map bdvmm built, with the backdoor range reserved, reached the kernel.
    vm.expect(
        "BIOS-e820: [mem 0x0000000000f00000-0x0000000000ffffff] reserved",
        Duration::from_secs(30),
    );
}
