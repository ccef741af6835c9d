//! introspect finds a running kernel from CR3 alone: the KASLR slide, phys_base and the direct-map
//! base, on the stock Debian kernel (System.map) and on the patched kernel (System.map, and the
//! Sensor Box descriptor with no symbol file at all).

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
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(backdoors_tests::bdvmm_bin())
            .args(["ctl", "--api"])
            .arg(&vm.api)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
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

#[test]
fn virtual_sensors_of_the_stock_kernel_move_like_real_ones() {
    use backdoors_tests::KernelFiles;
    use introspect::sensorbox::ids;
    use introspect::tasks::{self, KernelMem, Limits};
    use introspect::virtual_sensors::{VirtualSensors, TOTAL_FORKS};

    let (vm, loc, syms) = locate_in("BD_STOCK_VMLINUZ", "BD_STOCK_SYSTEM_MAP");
    let k = KernelFiles::load(&Images::load(), "BD_STOCK_VMLINUX", "BD_STOCK_SYSTEM_MAP");
    let (mem, _) = vm.memory();
    let km = KernelMem::new(&mem, loc.clone());
    let vs = VirtualSensors::new(&syms, &k.btf, &loc).unwrap();
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
    assert!(
        b.sensor(ids::FORK_FAILED).is_none(),
        "a stock kernel cannot count failed forks"
    );

    // NPROCS counts every task, as the walked table does (taken together, under the pause).
    let mut c = vm.client();
    c.pause(Some(Duration::from_secs(30))).unwrap();
    let table = tasks::process_table(&km, &k.layout, k.init_task(&loc), Limits::default()).unwrap();
    let s = vs.sample(&km).unwrap();
    c.resume().unwrap();
    let tasks: u64 = table.iter().map(|p| 1 + p.threads.len() as u64).sum();
    assert_eq!(s.value(ids::NPROCS), Some(tasks));
    assert!(s.value(TOTAL_FORKS).unwrap() >= tasks);
}
