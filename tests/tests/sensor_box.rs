//! The patched guest's Sensor Box, read from the host through bdvmm's memory API (on the kvm
//! engine: through a bridge inside the kvm host, which has that hand-off): every built-in sensor
//! reacts to the event it watches, the sensors move while the guest runs and freeze while it is
//! paused, the externalized state points at the right places, and the repair hooks kill a busy
//! and a sleeping task while refusing bad requests.

use std::time::{Duration, Instant};

use backdoors_tests::site::Engine;
use backdoors_tests::vm::{GuestMem, Vm, VmSpec};
use backdoors_tests::{kernel_code_phys, Images};
use introspect::hooks::{KillTarget, Mailbox, SlotState};
use introspect::kernel::Symbols;
use introspect::mem::PhysMem;
use introspect::sensorbox::{ids, SensorBox, SensorClass};

struct Guest {
    // Field order: the memory (a bridge, on kvm) goes before the VM it reads.
    mem: GuestMem,
    vm: Vm,
}

impl Guest {
    fn boot(params: &str, ready: &str) -> Self {
        Self::boot_on(Engine::Tcg, params, ready)
    }

    fn boot_on(engine: Engine, params: &str, ready: &str) -> Self {
        let img = Images::load();
        let spec = VmSpec::on(
            engine,
            img.get("BD_KERNEL_BZIMAGE"),
            img.get("BD_INITRAMFS"),
            &format!("quiet bd.halt=wait {params}"),
        );
        let mut vm = Vm::start(&spec);
        vm.expect_line(ready, Duration::from_secs(120));
        let mem = vm.guest_mem();
        Self { mem, vm }
    }

    fn sb(&self) -> SensorBox {
        self.mem
            .sensor_box()
            .unwrap_or_else(|e| panic!("{e}\n{}", self.vm.diagnostics()))
    }

    fn value(&self, id: u32) -> u64 {
        self.sb()
            .value(id)
            .unwrap_or_else(|| panic!("no sensor {id}"))
    }

    /// Polls until sensor `id` satisfies `ok`, or fails with its last value.
    fn wait_value(&self, id: u32, within: Duration, ok: impl Fn(u64) -> bool) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let v = self.value(id);
            if ok(v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "sensor {id} stuck at {v}\n{}",
                self.vm.stdout()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The number after `key=` on the first console line containing `prefix`.
fn field(out: &str, prefix: &str, key: &str) -> u64 {
    out.lines()
        .find(|l| l.contains(prefix))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
        })
        .and_then(|v| v.trim_end_matches('\r').parse().ok())
        .unwrap_or_else(|| panic!("no {key}= on a {prefix:?} line:\n{out}"))
}

fn sensors_advance_while_running_and_stall_while_paused(engine: Engine) {
    let g = Guest::boot_on(
        engine,
        "bd.scenario=counter backdoor.threshold=NPROCS:500,4:77,FREE_PAGES:2048",
        "COUNTER ready",
    );
    let sb = g.sb();
    // Thresholds set on the command line, by name and by number.
    assert_eq!(sb.sensor(ids::NPROCS).unwrap().threshold, 500);
    assert_eq!(sb.sensor(ids::MAXPROC_RATE_PERUID).unwrap().threshold, 77);
    assert_eq!(sb.sensor(ids::FREE_PAGES).unwrap().threshold, 2048);
    assert_eq!(sb.sensor(ids::FORK_FAILED).unwrap().threshold, 0);
    assert_eq!(sb.header.version, 1);
    assert_ne!(sb.header.boot_id, 0);
    assert!(sb.header.hz >= 100, "hz {}", sb.header.hz);
    for (id, name, class) in [
        (ids::TIMER_TICKS, "TIMER_TICKS", SensorClass::Progress),
        (
            ids::CONTEXT_SWITCHES,
            "CONTEXT_SWITCHES",
            SensorClass::Progress,
        ),
        (ids::NPROCS, "NPROCS", SensorClass::Level),
        (
            ids::MAXPROC_RATE_PERUID,
            "MAXPROC_RATE_PERUID",
            SensorClass::Level,
        ),
        (ids::FREE_PAGES, "FREE_PAGES", SensorClass::Level),
        (
            ids::OOM_KILLER_RUNNING,
            "OOM_KILLER_RUNNING",
            SensorClass::Pressure,
        ),
        (ids::FORK_FAILED, "FORK_FAILED", SensorClass::Pressure),
        (
            ids::FILE_TABLE_FULL,
            "FILE_TABLE_FULL",
            SensorClass::Pressure,
        ),
    ] {
        let s = sb.sensor(id).unwrap_or_else(|| panic!("no sensor {name}"));
        assert_eq!((s.name.as_str(), s.class), (name, class));
    }
    let nprocs = sb.value(ids::NPROCS).unwrap();
    assert!((20..1000).contains(&nprocs), "NPROCS {nprocs}");
    let free = sb.value(ids::FREE_PAGES).unwrap();
    assert!(
        free > 1000 && free < (512 << 20) / 4096,
        "FREE_PAGES {free}"
    );
    for v in [
        ids::OOM_KILLER_RUNNING,
        ids::FORK_FAILED,
        ids::FILE_TABLE_FULL,
    ] {
        assert_eq!(sb.value(v), Some(0), "sensor {v} in a healthy guest");
    }

    let t0 = g.value(ids::TIMER_TICKS);
    let c0 = g.value(ids::CONTEXT_SWITCHES);
    g.wait_value(ids::TIMER_TICKS, Duration::from_secs(5), |v| v > t0);
    g.wait_value(ids::CONTEXT_SWITCHES, Duration::from_secs(5), |v| v > c0);

    let mut c = g.vm.client();
    c.pause(Some(Duration::from_secs(10))).unwrap();
    let a = g.sb();
    std::thread::sleep(Duration::from_millis(400));
    let b = g.sb();
    assert_eq!(a, b, "the Sensor Box changed while the guest was paused");
    c.resume().unwrap();
    let t1 = a.value(ids::TIMER_TICKS).unwrap();
    g.wait_value(ids::TIMER_TICKS, Duration::from_secs(5), |v| v > t1);
    assert!(g.sb().header.publishes > a.header.publishes);
}

#[test]
fn tcg_sensors_advance_while_running_and_stall_while_paused() {
    sensors_advance_while_running_and_stall_while_paused(Engine::Tcg);
}

#[test]
fn kvm_sensors_advance_while_running_and_stall_while_paused() {
    sensors_advance_while_running_and_stall_while_paused(Engine::Kvm);
}

#[test]
fn externalized_state_needs_no_symbol_file() {
    let g = Guest::boot("bd.scenario=hello", "BACKDOORS: halt wait");
    let st = g
        .sb()
        .state
        .expect("the Sensor Box names the kernel's structures");
    let syms = Symbols::from_file(Images::load().get("BD_KERNEL_SYSTEM_MAP")).unwrap();
    // System.map holds link-time addresses; the descriptor holds run-time ones.
    for (name, addr) in [
        ("_text", st.text_virt),
        ("init_task", st.init_task),
        ("tasklist_lock", st.tasklist_lock),
        ("linux_banner", st.linux_banner),
        ("jiffies_64", st.jiffies_64),
        ("nr_threads", st.nr_threads),
        ("total_forks", st.total_forks),
    ] {
        assert_eq!(addr, syms.get(name).unwrap() + st.kaslr_offset, "{name}");
    }
    assert!(st.pgtable_levels == 4 || st.pgtable_levels == 5);
    assert!(st.nr_cpu_ids >= 1);
    // The guest's own word on where its code is, and the banner and BTF found from the
    // descriptor alone.
    let code = kernel_code_phys(&g.vm.stdout());
    assert_eq!(st.text_phys, code);
    let phys = |virt: u64| virt - st.text_virt + st.text_phys;
    let mut banner = [0u8; 14];
    g.mem.read(phys(st.linux_banner), &mut banner).unwrap();
    assert_eq!(&banner, b"Linux version ");
    assert!(st.btf_size > 1 << 20, "BTF of {} bytes", st.btf_size);
    let mut magic = [0u8; 2];
    g.mem.read(phys(st.btf_start), &mut magic).unwrap();
    assert_eq!(u16::from_le_bytes(magic), 0xeb9f, "BTF magic");
}

#[test]
fn a_fork_storm_raises_nprocs_and_the_per_user_fork_rate() {
    let g = Guest::boot(
        "bd.scenario=forkstorm bd.count=300",
        "SCENARIO forkstorm: spawned",
    );
    let procs = field(&g.vm.stdout(), "SCENARIO forkstorm: spawned", "processes");
    let nprocs = g.value(ids::NPROCS);
    // The scenario counts /proc from inside `$(bd_nprocs)`, a subshell that is itself one of the
    // processes it counts and has exited by the time the sensor is read.
    assert!(
        nprocs + 1 >= procs && nprocs >= 300,
        "NPROCS {nprocs}, /proc shows {procs} (the counting subshell included)"
    );
    let rate = g.value(ids::MAXPROC_RATE_PERUID);
    assert!(
        rate >= 50,
        "MAXPROC_RATE_PERUID {rate} right after 300 forks"
    );
    // After two quiet seconds the rate falls back.
    g.wait_value(ids::MAXPROC_RATE_PERUID, Duration::from_secs(10), |v| {
        v < 10
    });
}

#[test]
fn a_fork_limit_drives_fork_failed() {
    let g = Guest::boot(
        "bd.scenario=forkfail bd.nproc=30 bd.count=100",
        "SCENARIO forkfail: spawned",
    );
    let failed = field(&g.vm.stdout(), "SCENARIO forkfail: spawned", "failed");
    assert!(failed > 0, "spawn saw no failed fork");
    let v = g.value(ids::FORK_FAILED);
    assert!(v >= failed, "FORK_FAILED {v}, spawn saw {failed} failures");
    assert!(g.sb().sensor(ids::FORK_FAILED).unwrap().level_violated());
}

#[test]
fn an_allocation_storm_drives_the_oom_sensors() {
    let g = Guest::boot("bd.scenario=oom bd.seconds=30", "SCENARIO oom: started");
    g.wait_value(ids::OOM_KILLER_RUNNING, Duration::from_secs(90), |v| v > 0);
    g.wait_value(ids::OOM_KILLS, Duration::from_secs(90), |v| v > 0);
}

#[test]
fn a_full_file_table_drives_file_table_full() {
    let g = Guest::boot(
        "bd.scenario=filemax bd.filemax=256",
        "SCENARIO filemax: full",
    );
    assert!(
        g.vm.stdout().contains("errno=23"),
        "expected ENFILE:\n{}",
        g.vm.stdout()
    );
    assert!(g.value(ids::FILE_TABLE_FULL) > 0);
}

fn repair_hooks_kill_a_busy_and_a_sleeping_task_and_refuse_bad_requests(engine: Engine) {
    let mut g = Guest::boot_on(engine, "bd.scenario=repair", "REPAIR sleeper pid=");
    let out = g.vm.stdout();
    let busy = u32::try_from(field(&out, "REPAIR busy", "pid")).unwrap();
    let sleeper = u32::try_from(field(&out, "REPAIR sleeper", "pid")).unwrap();
    let sb = g.sb();
    let mb = Mailbox::open(&g.mem, &sb).unwrap();
    let mut c = g.vm.client();

    // Through the bridge (a kvm host), writes need the bridge's lock: pause through `g.mem`.
    g.mem.pause(&mut c, Duration::from_secs(10)).unwrap();
    let s_busy = mb
        .post(
            &g.mem,
            KillTarget::Pid {
                pid: busy,
                start_time: 0,
            },
            1,
        )
        .unwrap();
    let s_sleep = mb
        .post(
            &g.mem,
            KillTarget::Pid {
                pid: sleeper,
                start_time: 0,
            },
            2,
        )
        .unwrap();
    let s_init = mb
        .post(
            &g.mem,
            KillTarget::Pid {
                pid: 1,
                start_time: 0,
            },
            3,
        )
        .unwrap();
    let s_root = mb.post(&g.mem, KillTarget::Uid(0), 4).unwrap();
    let s_wild = mb
        .post(
            &g.mem,
            KillTarget::Pid {
                pid: 5_000_000,
                start_time: 0,
            },
            5,
        )
        .unwrap();
    let s_gone = mb
        .post(
            &g.mem,
            KillTarget::Pid {
                pid: 4_000_000,
                start_time: 0,
            },
            5,
        )
        .unwrap();
    // A live pid with the wrong start time stands for a pid that was reused.
    let s_stale = mb
        .post(
            &g.mem,
            KillTarget::Pid {
                pid: sleeper,
                start_time: 1,
            },
            6,
        )
        .unwrap();
    let mut junk = [0xa5u8; 32];
    junk[0..4].copy_from_slice(&77u32.to_le_bytes());
    mb.post_raw(&g.mem, 40, &junk).unwrap();
    g.mem.resume(&mut c).unwrap();

    g.vm.expect(
        &format!("REPAIR exited pid={busy} status=137"),
        Duration::from_secs(30),
    );
    g.vm.expect(
        &format!("REPAIR exited pid={sleeper} status=137"),
        Duration::from_secs(30),
    );
    g.vm.expect("SCENARIO repair: all exited", Duration::from_secs(30));
    assert_eq!(mb.slot(&g.mem, s_busy).unwrap(), SlotState::Done(1));
    assert_eq!(mb.slot(&g.mem, s_sleep).unwrap(), SlotState::Done(1));
    const EPERM: u32 = 1;
    const ESRCH: u32 = 3;
    const EINVAL: u32 = 22;
    const ESTALE: u32 = 116;
    assert_eq!(mb.slot(&g.mem, s_init).unwrap(), SlotState::Rejected(EPERM));
    assert_eq!(mb.slot(&g.mem, s_root).unwrap(), SlotState::Rejected(EPERM));
    assert_eq!(
        mb.slot(&g.mem, s_wild).unwrap(),
        SlotState::Rejected(EINVAL)
    );
    assert_eq!(mb.slot(&g.mem, s_gone).unwrap(), SlotState::Rejected(ESRCH));
    let stale = mb.slot(&g.mem, s_stale).unwrap();
    // The sleeper may already be dead when the stale request is looked at.
    assert!(
        stale == SlotState::Rejected(ESTALE) || stale == SlotState::Rejected(ESRCH),
        "{stale:?}"
    );
    assert_eq!(mb.slot(&g.mem, 40).unwrap(), SlotState::Rejected(EINVAL));
    let counters = mb.counters(&g.mem).unwrap();
    assert_eq!(counters.processed, counters.doorbell);
    assert_eq!(counters.applied, 2);
    assert_eq!(counters.rejected, 6);
    let sb = g.sb();
    assert_eq!(sb.value(ids::REPAIRS_APPLIED), Some(2));
    assert_eq!(sb.value(ids::REPAIRS_REJECTED), Some(6));
    // The guest is fine afterwards.
    let t = sb.value(ids::TIMER_TICKS).unwrap();
    g.wait_value(ids::TIMER_TICKS, Duration::from_secs(5), |v| v > t);
}

#[test]
fn tcg_repair_hooks_kill_a_busy_and_a_sleeping_task_and_refuse_bad_requests() {
    repair_hooks_kill_a_busy_and_a_sleeping_task_and_refuse_bad_requests(Engine::Tcg);
}

#[test]
fn kvm_repair_hooks_kill_a_busy_and_a_sleeping_task_and_refuse_bad_requests() {
    repair_hooks_kill_a_busy_and_a_sleeping_task_and_refuse_bad_requests(Engine::Kvm);
}

/// The per-user fork table that the descriptor names, read with the guest paused: the user whose
/// forks drive `MAXPROC_RATE_PERUID`, at the sensor's own value; stale windows drop out of it.
#[test]
fn the_fork_table_names_the_user_behind_maxproc_rate_peruid() {
    use introspect::forkrate::{per_user_fork_rates, ForkRate};
    use introspect::kernel;

    const USER1: u32 = 1000;
    /// One paused read: the Sensor Box, then the table at the header's window.
    fn read_paused(g: &Guest) -> (SensorBox, Vec<ForkRate>) {
        let mut c = g.vm.client();
        c.pause(Some(Duration::from_secs(10))).unwrap();
        let sb = g.sb();
        let st = sb.state.clone().expect("descriptor");
        let loc = kernel::from_descriptor(&g.mem, &st, 0).unwrap();
        let rates = per_user_fork_rates(&g.mem, &loc, &st, sb.header.jiffies, sb.header.hz)
            .unwrap_or_else(|e| panic!("{e}"));
        c.resume().unwrap();
        (sb, rates)
    }

    let mut g = Guest::boot(
        "bd.scenario=forkstorm bd.count=300",
        "SCENARIO forkstorm: base processes",
    );
    let syms = Symbols::from_file(Images::load().get("BD_KERNEL_SYSTEM_MAP")).unwrap();

    // Catch the storm while it runs.
    g.wait_value(ids::MAXPROC_RATE_PERUID, Duration::from_secs(60), |v| {
        v >= 50
    });
    let (sb, rates) = read_paused(&g);
    let st = sb.state.as_ref().unwrap();
    let (addr, nr, size) = st.fork_users.expect("the descriptor names the fork table");
    assert_eq!((nr, size), (64, 24));
    assert_eq!(
        addr,
        syms.get("bd_fork_users").unwrap() + st.kaslr_offset,
        "bd_fork_users"
    );
    let sensor = sb.value(ids::MAXPROC_RATE_PERUID).unwrap();
    let top = *rates.first().expect("someone forks");
    eprintln!(
        "fork storm: MAXPROC_RATE_PERUID {sensor}, table {rates:?} at jiffies {} (HZ {})",
        sb.header.jiffies, sb.header.hz
    );
    assert_eq!(top.uid, USER1, "{rates:?}");
    assert_eq!(u64::from(top.rate), sensor, "{rates:?}");
    assert!(sensor >= 50);

    // Once the storm is over, user1's windows go stale and the table agrees with the sensor again.
    g.vm.expect_line("SCENARIO forkstorm: spawned", Duration::from_secs(120));
    g.wait_value(ids::MAXPROC_RATE_PERUID, Duration::from_secs(10), |v| {
        v < 10
    });
    let (sb, rates) = read_paused(&g);
    let sensor = sb.value(ids::MAXPROC_RATE_PERUID).unwrap();
    eprintln!("after the storm: MAXPROC_RATE_PERUID {sensor}, table {rates:?}");
    assert!(rates.iter().all(|r| r.uid != USER1), "{rates:?}");
    assert_eq!(u64::from(rates.first().map_or(0, |r| r.rate)), sensor);
}
