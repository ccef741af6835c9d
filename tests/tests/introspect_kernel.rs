//! introspect finds a running kernel from CR3 alone: the KASLR slide, phys_base and the direct-map
//! base, on the stock Debian kernel (System.map) and on the patched kernel (System.map, and the
//! Sensor Box descriptor with no symbol file at all); and, with no files at all, the virtual sensors
//! of Debian's stock 6.1 and 6.12 kernels.

use std::time::Duration;

use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::{kernel_code_phys, Images};
use introspect::kernel::{self, Symbols};
use introspect::sensorbox;

fn locate_in(kernel_key: &str, map_key: &str) -> (Vm, kernel::KernelLocation, Symbols) {
    let img = Images::load();
    let spec = VmSpec::tcg(
        img.get(kernel_key),
        img.get("BD_INITRAMFS"),
        "quiet bd.scenario=hello bd.halt=wait",
    );
    let mut vm = Vm::start(&spec);
    vm.expect("BACKDOORS: halt wait", Duration::from_secs(90));
    let (mem, _) = vm.memory();
    let syms = Symbols::from_file(img.get(map_key)).unwrap();
    let (mut c, loc) = vm.pause_and_locate(&mem, &syms, Duration::from_secs(30));
    c.resume().unwrap();
    // The guest's own /proc/iomem says where _text is physically.
    let text = syms.get("_text").unwrap() + loc.slide;
    assert_eq!(
        loc.image_phys(text),
        kernel_code_phys(&vm.stdout()),
        "{loc:?}"
    );
    assert_eq!(loc.slide % (2 << 20), 0);
    (vm, loc, syms)
}

/// `bdvmm ctl --api <vm's socket> <args>`: its stdout; it must succeed.
fn bdvmm_ctl(vm: &Vm, args: &[&str]) -> String {
    let out = std::process::Command::new(backdoors_tests::bdvmm_bin())
        .args(["ctl", "--api"])
        .arg(&vm.api)
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bdvmm ctl {args:?}: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn locates_the_stock_debian_kernel_from_cr3_and_system_map() {
    let (_vm, loc, _) = locate_in("BD_STOCK_VMLINUZ", "BD_STOCK_SYSTEM_MAP");
    assert!(loc.page_offset_base >= 0xff00_0000_0000_0000, "{loc:?}");
}

#[test]
fn locates_the_patched_kernel_with_and_without_system_map() {
    let (vm, loc, _) = locate_in("BD_KERNEL_BZIMAGE", "BD_KERNEL_SYSTEM_MAP");
    let (mem, map) = vm.memory();
    let sb = sensorbox::read(&mem, map.backdoor.gpa, map.backdoor.size, 1000).unwrap();
    let st = sb.state.expect("descriptor");
    let from_sb = kernel::from_descriptor(&mem, &st, 0).unwrap();
    assert_eq!(from_sb.slide, loc.slide);
    assert_eq!(from_sb.phys_base, loc.phys_base);
    assert_eq!(from_sb.page_offset_base, loc.page_offset_base);
}

#[test]
fn bdvmm_ctl_ps_and_sb_read_a_patched_guest_with_no_symbol_files() {
    let img = Images::load();
    let spec = VmSpec::tcg(
        img.get("BD_KERNEL_BZIMAGE"),
        img.get("BD_INITRAMFS"),
        "quiet bd.scenario=hello bd.halt=wait",
    );
    let mut vm = Vm::start(&spec);
    vm.expect("BACKDOORS: halt wait", Duration::from_secs(90));
    let ctl = |args: &[&str]| bdvmm_ctl(&vm, args);
    let ps = ctl(&["ps"]);
    assert!(ps.lines().next().unwrap().contains("PID"), "{ps}");
    assert!(ps.lines().any(|l| l.ends_with(" [kthreadd]")), "{ps}");
    assert!(
        ps.lines().any(|l| l.split_whitespace().nth(1) == Some("1")),
        "{ps}"
    );
    let sb = ctl(&["sb"]);
    for name in ["TIMER_TICKS", "NPROCS", "FORK_FAILED", "REPAIRS_REJECTED"] {
        assert!(sb.contains(name), "{sb}");
    }
    let json: serde_json::Value = serde_json::from_str(&ctl(&["ps", "--json"])).unwrap();
    assert!(json.as_array().unwrap().len() > 10);
    // The guest runs on after the brief pause ps takes.
    assert_eq!(vm.client().status().unwrap().state, "running");
}

/// A stock guest with no files: `bdvmm ctl sb` shows its virtual sensors, `ctl ps` its processes,
/// the sensors move between two samples like real ones, and NPROCS counts what the walk finds.
fn virtual_sensors_of_a_stock_kernel_move_with_no_files(kernel_key: &str) {
    use introspect::sensorbox::ids;
    use introspect::target::{KernelFiles, StockKernel, Target};
    use introspect::tasks::KernelMem;
    use introspect::virtual_sensors::{VirtualSensors, TOTAL_FORKS};

    let img = Images::load();
    let spec = VmSpec::tcg(
        img.get(kernel_key),
        img.get("BD_INITRAMFS"),
        "quiet bd.scenario=hello bd.halt=wait",
    );
    let mut vm = Vm::start(&spec);
    vm.expect("BACKDOORS: halt wait", Duration::from_secs(90));
    let ctl = |args: &[&str]| bdvmm_ctl(&vm, args);
    let sb = ctl(&["sb"]);
    for name in [
        "TIMER_TICKS",
        "CONTEXT_SWITCHES",
        "NPROCS",
        "FREE_PAGES",
        "TOTAL_FORKS",
    ] {
        assert!(sb.contains(name), "{sb}");
    }
    let ps = ctl(&["ps"]);
    assert!(ps.lines().any(|l| l.ends_with(" [kthreadd]")), "{ps}");

    let (mem, _) = vm.memory();
    let mut c = vm.client();
    c.pause(Some(Duration::from_secs(30))).unwrap();
    let regs = c.regs(0).unwrap();
    c.resume().unwrap();
    let (k, loc) = StockKernel::discover(&mem, regs.cr3, regs.cr4).expect("discover");
    assert!(k.from_memory());
    let release = k.release().unwrap_or_default().to_string();
    assert!(
        kernel_key != "BD_STOCK612_VMLINUZ" || release.starts_with("6.12."),
        "{release}"
    );
    let km = KernelMem::new(&mem, loc.clone());
    let vs = VirtualSensors::new_for(k.symbols(), k.btf(), &loc, &release).unwrap();
    assert!(vs.unresolved().is_empty(), "{:?}", vs.unresolved());
    let a = vs.sample(&km).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let b = vs.sample(&km).unwrap();
    assert!(b.value(ids::TIMER_TICKS) > a.value(ids::TIMER_TICKS));
    assert!(b.value(ids::CONTEXT_SWITCHES) > a.value(ids::CONTEXT_SWITCHES));
    let free = b.value(ids::FREE_PAGES).unwrap();
    assert!(
        free > 1000 && free < (512 << 20) / 4096,
        "FREE_PAGES {free}"
    );
    assert_eq!(b.value(ids::OOM_KILLS), Some(0));
    // Runnable tasks and per-CPU progress, from the runqueues (an idle guest: none held).
    assert!(b.value(ids::NR_RUNNING).is_some_and(|n| n < 100), "{b:?}");
    assert!(b.value(ids::CPU_PROGRESS) >= a.value(ids::CPU_PROGRESS));
    assert!(a.value(ids::CPU_PROGRESS).is_some_and(|ms| ms > 0));
    assert!(
        b.sensor(ids::FORK_FAILED).is_none(),
        "a stock kernel cannot count failed forks"
    );

    // NPROCS counts every task, as the walked table does (taken together, under the pause).
    c.pause(Some(Duration::from_secs(30))).unwrap();
    let target = Target::locate(&mem, regs.cr3, regs.cr4, KernelFiles::Stock(&k)).unwrap();
    let table = target.walk(&mem).unwrap();
    let s = vs.sample(&km).unwrap();
    c.resume().unwrap();
    let tasks: u64 = table.iter().map(|p| 1 + p.threads.len() as u64).sum();
    assert!(
        table.iter().any(|p| p.task.pid == 1 && p.cpu_ns > 0),
        "init used no CPU time?"
    );
    assert_eq!(s.value(ids::NPROCS), Some(tasks));
    assert!(s.value(TOTAL_FORKS).unwrap() >= tasks);
}

#[test]
fn virtual_sensors_of_the_stock_6_1_kernel_move_with_no_files() {
    virtual_sensors_of_a_stock_kernel_move_with_no_files("BD_STOCK_VMLINUZ");
}

#[test]
fn virtual_sensors_of_the_stock_6_12_kernel_move_with_no_files() {
    virtual_sensors_of_a_stock_kernel_move_with_no_files("BD_STOCK612_VMLINUZ");
}
