//! Real guests boot under bdvmm on both engines: the patched kernel and the stock Debian 6.1 and
//! 6.12 kernels to /init with 1 and 2 vCPUs, a scenario, and a clean exit when the guest ends; a
//! guest panic ends bdvmm with its reason; on the kvm engine also the PVH entry of a vmlinux,
//! `--engine auto`, and the exact command line and e820 map bdvmm passed.

use std::sync::Arc;
use std::time::Duration;

use backdoors_tests::site::{Engine, Site};
use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::Images;

const BOOT: Duration = Duration::from_secs(120);

/// Boots `kernel_key` with `hello` on `site`, checks the scenario, the kernel release the guest
/// reports (it starts with `series` and a dot), the vCPU count the guest sees and bdvmm's clean
/// exit.
fn boot_hello_and_end(engine: Engine, site: &Arc<Site>, kernel_key: &str, series: &str, vcpus: u8) {
    let img = Images::load();
    let mut spec = VmSpec::on(
        engine,
        img.get(kernel_key),
        img.get("BD_INITRAMFS"),
        "bd.scenario=hello",
    );
    spec.vcpus = vcpus;
    spec.site = Some(site.clone());
    let mut vm = Vm::start(&spec);
    vm.expect("BACKDOORS: ready", BOOT);
    vm.expect("BACKDOORS: scenario hello started", BOOT);
    vm.expect("BACKDOORS: scenario hello finished rc=0", BOOT);
    vm.expect("BACKDOORS: poweroff", BOOT);
    let status = vm.wait_exit(BOOT).unwrap_or_else(|| {
        panic!(
            "bdvmm did not exit after the guest ended\n{}",
            vm.diagnostics()
        )
    });
    assert!(status.success(), "exit {status}\n{}", vm.diagnostics());
    // Both engines give the guest ACPI (QEMU's `pc`; bdvmm's own tables on kvm), so it powers off
    // through S5.
    assert!(
        vm.stderr()
            .contains("bdvmm: guest stopped: guest powered off"),
        "{}",
        vm.diagnostics()
    );
    let out = vm.stdout();
    assert!(out.contains(&format!("HELLO from {series}.")), "{out}");
    assert!(
        out.contains(&format!("HELLO cpus={vcpus} ")),
        "the guest does not see {vcpus} vCPU(s):\n{out}"
    );
    // The backdoor range is reserved in the map the guest uses.
    assert!(
        out.contains("backdoor.sb=0xf00000,0x100000"),
        "cmdline not passed:\n{out}"
    );
}

fn boots_with_1_and_2_vcpus(engine: Engine, kernel_key: &str, series: &str) {
    let site = Site::for_engine(engine);
    for vcpus in [1, 2] {
        boot_hello_and_end(engine, &site, kernel_key, series, vcpus);
    }
}

#[test]
fn tcg_boots_the_patched_kernel_with_1_and_2_vcpus() {
    boots_with_1_and_2_vcpus(Engine::Tcg, "BD_KERNEL_BZIMAGE", "6.1");
}

#[test]
fn kvm_boots_the_patched_kernel_with_1_and_2_vcpus() {
    boots_with_1_and_2_vcpus(Engine::Kvm, "BD_KERNEL_BZIMAGE", "6.1");
}

#[test]
fn tcg_boots_the_stock_debian_kernel_with_1_and_2_vcpus() {
    boots_with_1_and_2_vcpus(Engine::Tcg, "BD_STOCK_VMLINUZ", "6.1");
}

#[test]
fn kvm_boots_the_stock_debian_kernel_with_1_and_2_vcpus() {
    boots_with_1_and_2_vcpus(Engine::Kvm, "BD_STOCK_VMLINUZ", "6.1");
}

/// Debian's cloud 6.12 kernel (bookworm-backports, `images/stock/fetch.sh --series 6.12`).
#[test]
fn tcg_boots_the_stock_debian_6_12_kernel_with_1_and_2_vcpus() {
    boots_with_1_and_2_vcpus(Engine::Tcg, "BD_STOCK612_VMLINUZ", "6.12");
}

#[test]
fn kvm_boots_the_stock_debian_6_12_kernel_with_1_and_2_vcpus() {
    boots_with_1_and_2_vcpus(Engine::Kvm, "BD_STOCK612_VMLINUZ", "6.12");
}

fn guest_panic_ends_bdvmm_with_a_reason(engine: Engine) {
    let img = Images::load();
    // An init that does not exist: the kernel panics ("No working init found").
    let spec = VmSpec::on(
        engine,
        img.get("BD_KERNEL_BZIMAGE"),
        img.get("BD_INITRAMFS"),
        "rdinit=/nonexistent init=/nonexistent",
    );
    let mut vm = Vm::start(&spec);
    let status = vm.wait_exit(BOOT).unwrap_or_else(|| {
        panic!(
            "bdvmm did not exit after a guest panic\n{}",
            vm.diagnostics()
        )
    });
    assert_eq!(status.code(), Some(1), "{}", vm.diagnostics());
    let last = vm.stderr().lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("bdvmm: error: guest kernel panic: Kernel panic - not syncing"),
        "{last}"
    );
}

#[test]
fn tcg_guest_panic_ends_bdvmm_with_a_reason() {
    guest_panic_ends_bdvmm_with_a_reason(Engine::Tcg);
}

#[test]
fn kvm_guest_panic_ends_bdvmm_with_a_reason() {
    guest_panic_ends_bdvmm_with_a_reason(Engine::Kvm);
}

/// `--on-panic keep`: a panicked guest (`panic=0`: it stays dead) keeps its VM, whose API and
/// memory still answer; when the VM ends later, for another reason (here a SIGTERM), bdvmm says
/// both the panic and that reason.
#[test]
fn tcg_a_kept_panicked_guest_stays_reachable_and_its_end_says_why() {
    let img = Images::load();
    let mut spec = VmSpec::on(
        Engine::Tcg,
        img.get("BD_KERNEL_BZIMAGE"),
        img.get("BD_INITRAMFS"),
        "rdinit=/nonexistent init=/nonexistent panic=0",
    );
    spec.extra = vec!["--on-panic".into(), "keep".into()];
    let mut vm = Vm::start(&spec);
    let deadline = std::time::Instant::now() + BOOT;
    while !vm.stderr().contains("the VM is kept (--on-panic keep)") {
        assert!(
            vm.try_exit().is_none() && std::time::Instant::now() < deadline,
            "the panicked VM was not kept\n{}",
            vm.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = vm.client().status().expect("status of the kept VM");
    assert!(st.mem_bytes > 0, "{st:?}");
    let (_mem, map) = vm.memory();
    assert_eq!(map.size, st.mem_bytes, "{map:?}");
    let pid = vm.local_pid().expect("bdvmm's pid");
    let pid = i32::try_from(pid).expect("a pid");
    // SAFETY: a signal to the bdvmm this test started.
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let status = vm
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("bdvmm ignored SIGTERM\n{}", vm.diagnostics()));
    assert_eq!(status.code(), Some(1), "{}", vm.diagnostics());
    let last = vm.stderr().lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("bdvmm: error: guest kernel panic: Kernel panic - not syncing")
            && last.contains("kept after it (--on-panic keep), ended: bdvmm stopped by signal 15"),
        "{last}"
    );
}

/// A guest that reboots its machine ends bdvmm by default (status 0, as a poweroff); with
/// `--on-reset restart` it boots again in place, as it does after the API's `reset`.
fn guest_reboot_exits_or_restarts_in_place(engine: Engine) {
    let img = Images::load();
    let site = Site::for_engine(engine);
    let spec = |extra: &[&str], params: &str| {
        let mut s = VmSpec::on(
            engine,
            img.get("BD_KERNEL_BZIMAGE"),
            img.get("BD_INITRAMFS"),
            &format!("quiet bd.scenario=hello {params}"),
        );
        s.vcpus = 2;
        s.site = Some(site.clone());
        s.extra = extra.iter().map(|a| a.to_string()).collect();
        s
    };
    let mut vm = Vm::start(&spec(&[], "bd.halt=reboot"));
    vm.expect("BACKDOORS: reboot", BOOT);
    let st = vm
        .wait_exit(BOOT)
        .unwrap_or_else(|| panic!("a guest reboot did not end bdvmm\n{}", vm.diagnostics()));
    assert!(st.success(), "{st}\n{}", vm.diagnostics());
    assert!(vm.stderr().contains("guest reset"), "{}", vm.diagnostics());

    // Restart in place: the guest reboots itself twice, and bdvmm boots it again each time.
    let mut vm = Vm::start(&spec(&["--on-reset", "restart"], "bd.halt=reboot"));
    let deadline = std::time::Instant::now() + 2 * BOOT;
    while vm.stdout().matches("HELLO cpus=2 ").count() < 3 {
        assert!(
            vm.try_exit().is_none() && std::time::Instant::now() < deadline,
            "no third boot\n{}",
            vm.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(vm);

    // The API's reset, on a guest that stays up: the same guest boots again on the same memory.
    let mut vm = Vm::start(&spec(&[], "bd.halt=wait"));
    vm.expect("BACKDOORS: halt wait", BOOT);
    let boot_id = |vm: &Vm| vm.guest_mem().sensor_box().map(|sb| sb.header.boot_id);
    let before = boot_id(&vm).unwrap_or_else(|e| panic!("{e}\n{}", vm.diagnostics()));
    vm.client().reset().expect("reset");
    let deadline = std::time::Instant::now() + BOOT;
    while vm.stdout().matches("BACKDOORS: halt wait").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no second boot after reset\n{}",
            vm.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = boot_id(&vm).unwrap_or_else(|e| panic!("{e}\n{}", vm.diagnostics()));
    assert_ne!(before, after, "the Sensor Box is the old boot's");
    assert!(vm.try_exit().is_none(), "{}", vm.diagnostics());
}

#[test]
fn tcg_guest_reboot_exits_or_restarts_in_place() {
    guest_reboot_exits_or_restarts_in_place(Engine::Tcg);
}

#[test]
fn kvm_guest_reboot_exits_or_restarts_in_place() {
    guest_reboot_exits_or_restarts_in_place(Engine::Kvm);
}

/// Inside a kvm host: a vmlinux boots through its PVH entry with `--engine auto` (which must pick
/// kvm there), and the kernel sees exactly the command line and e820 map bdvmm built.
#[test]
fn kvm_auto_engine_boots_a_vmlinux_through_pvh_with_the_exact_cmdline_and_e820() {
    let img = Images::load();
    let site = Site::kvm_host();
    let cmdline = "console=ttyS0 earlyprintk=serial reboot=k panic=-1 bd.scenario=hello";
    let spec = VmSpec {
        kernel: img.get("BD_KERNEL_VMLINUX").to_path_buf(),
        initrd: Some(img.get("BD_INITRAMFS").to_path_buf()),
        cmdline: cmdline.into(),
        engine: Engine::Kvm,
        mem: 256,
        vcpus: 2,
        extra: vec!["--engine".into(), "auto".into()],
        site: Some(site),
    };
    let mut vm = Vm::start(&spec);
    vm.expect("HELLO from 6.1.", BOOT);
    let err = vm.stderr();
    assert!(
        err.contains("bdvmm: engine auto -> kvm (host CPU has vmx/svm)"),
        "{}",
        vm.diagnostics()
    );
    // bdvmm prints the command line it passed; the kernel must echo exactly that.
    let passed = err
        .lines()
        .find_map(|l| l.strip_prefix("bdvmm: cmdline: ").map(str::to_string))
        .expect("bdvmm prints its command line");
    assert!(passed.starts_with(cmdline) && passed.contains("backdoor.sb="));
    let echoed = vm
        .stdout()
        .lines()
        .find_map(|l| {
            l.split_once("Command line: ")
                .map(|(_, c)| c.trim_end_matches('\r').to_string())
        })
        .unwrap_or_else(|| panic!("no command line echoed\n{}", vm.diagnostics()));
    assert_eq!(echoed, passed, "the kernel saw a different command line");
    // The e820 map bdvmm built, with the backdoor range reserved, reached the kernel.
    assert!(
        vm.stdout()
            .contains("BIOS-e820: [mem 0x0000000000f00000-0x0000000000ffffff] reserved"),
        "{}",
        vm.diagnostics()
    );
    vm.expect("HELLO cpus=2 ", BOOT);
    assert!(vm.wait_exit(BOOT).is_some_and(|s| s.success()));
}
