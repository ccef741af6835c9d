//! A SIGKILL posted from outside, found through the introspected process table, kills a
//! CPU-bound process and a sleeping one: through the repair-hook mailbox on the patched kernel,
//! and by direct writes to the task structures on the stock kernel (whose sleeper must wake up
//! to notice; see introspect/src/repair.rs).

use std::time::Duration;

use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::{Images, KernelFiles};
use introspect::repair::{self, DirectLayout, Posted};
use introspect::sensorbox;
use introspect::tasks::{self, KernelMem, Limits};

fn pid_after(out: &str, prefix: &str) -> u32 {
    out.lines()
        .find_map(|l| l.trim_end_matches('\r').split(prefix).nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{out}"))
}

fn kill_busy_and_sleeping(
    kernel_key: &str,
    vmlinux_key: &str,
    map_key: &str,
    params: &str,
    patched: bool,
) {
    let img = Images::load();
    let spec = VmSpec::tcg(
        img.get(kernel_key),
        img.get("BD_INITRAMFS"),
        &format!("quiet bd.scenario=repair bd.halt=wait {params}"),
    );
    let mut vm = Vm::start(&spec);
    vm.expect_line("REPAIR sleeper pid=", Duration::from_secs(120));
    let out = vm.stdout();
    let busy = pid_after(&out, "REPAIR busy pid=");
    let sleeper = pid_after(&out, "REPAIR sleeper pid=");

    let k = KernelFiles::load(&img, vmlinux_key, map_key);
    let direct = DirectLayout::from_btf(&k.btf).unwrap();
    let (mem, map) = vm.memory();
    let (mut c, loc) = vm.pause_and_locate(&mem, &k.syms, Duration::from_secs(30));
    let km = KernelMem::new(&mem, loc.clone());
    let table = tasks::process_table(&km, &k.layout, k.init_task(&loc), Limits::default()).unwrap();
    let sb = sensorbox::read(&mem, map.backdoor.gpa, map.backdoor.size, 100).ok();
    assert_eq!(sb.is_some(), patched);
    for pid in [busy, sleeper] {
        let p = table
            .iter()
            .find(|p| p.task.pid == pid)
            .expect("target in the table");
        assert_eq!(p.task.uid, 1000);
        let posted = repair::post_sigkill(&mem, &km, sb.as_ref(), &direct, p).unwrap();
        assert_eq!(
            matches!(posted, Posted::Mailbox { .. }),
            patched,
            "{posted:?}"
        );
    }
    // init and kernel threads are refused.
    let init = table.iter().find(|p| p.task.pid == 1).unwrap();
    assert!(repair::post_sigkill(&mem, &km, sb.as_ref(), &direct, init).is_err());
    c.resume().unwrap();

    vm.expect(
        &format!("REPAIR exited pid={busy} status=137"),
        Duration::from_secs(30),
    );
    vm.expect(
        &format!("REPAIR exited pid={sleeper} status=137"),
        Duration::from_secs(30),
    );
    vm.expect("SCENARIO repair: all exited", Duration::from_secs(30));
}

#[test]
fn sigkill_through_the_mailbox_on_the_patched_kernel() {
    kill_busy_and_sleeping(
        "BD_KERNEL_BZIMAGE",
        "BD_KERNEL_VMLINUX",
        "BD_KERNEL_SYSTEM_MAP",
        "",
        true,
    );
}

#[test]
fn sigkill_by_direct_writes_on_the_stock_kernel() {
    kill_busy_and_sleeping(
        "BD_STOCK_VMLINUZ",
        "BD_STOCK_VMLINUX",
        "BD_STOCK_SYSTEM_MAP",
        "bd.sleeper=naps",
        false,
    );
}
