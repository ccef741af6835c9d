//! Device benchmarks: bdvmm's kvm engine against QEMU `-accel kvm`, side by side in one run
//! (issue 13). Both run inside ONE kvm host (nested: QEMU TCG emulating AMD-V), one after the
//! other, with the same guest kernel (the patched bzImage), the same root filesystem image (the
//! kvm host's `/dev/vda` for bdvmm, `/dev/vdb`, another copy-on-write copy of it, for QEMU), the
//! same RAM and vCPUs, and the same device kind: virtio-mmio (QEMU as `-M microvm`), virtio-blk
//! on raw files and virtio-net on a tap with vhost-net.
//!
//! Per VMM it measures:
//! * boot: VMM start → the guest's `BACKDOORS: service up` (root filesystem from the disk);
//! * disk: the rootfs image's `fio` scenario on the guest's `/dev/vdb`, a file in the kvm host's
//!   tmpfs (sequential read and write with 1 MiB blocks, 4 KiB random reads at queue depth 32
//!   and at depth 1 with its latency percentiles; O_DIRECT in the guest);
//! * network, between the kvm host and the guest over a tap inside the kvm host: `iperf3` TCP
//!   throughput both ways, and a ping-pong, `redis-benchmark -c 1 -t ping_mbulk` against the
//!   guest's redis (one request in flight: each request is one round trip), median and p99.
//!
//! The VMMs (`--vmms`, default all four, in this order):
//! * `bdvmm`: `bdvmm run --engine kvm` with `--disk` and `--net tap=`;
//! * `qemu`: `qemu-system-x86_64 -M microvm -accel kvm` with `virtio-blk-device` and
//!   `virtio-net-device` (`vhost=on`): QEMU's defaults, which for microvm include a *split*
//!   irqchip (the IOAPIC in QEMU's user space, so every device interrupt passes through QEMU);
//! * `qemu-kirq`: the same with `kernel-irqchip=on,ioapic2=off`: the IOAPIC in KVM and the
//!   devices' interrupts through irqfd, as bdvmm does;
//! * `qemu-bdfeat`: `qemu-kirq` with the virtio features bdvmm does not offer switched off (no
//!   checksum or segmentation offloads on the network, no indirect descriptors): the same device,
//!   interrupt path *and* feature set.
//!
//! `cargo bench -p backdoors-tests --bench devices [-- --vmms bdvmm,qemu,qemu-kirq,qemu-bdfeat
//!  --seconds 5 --pings 2000 --disk-mib 256]`
//!
//! Needs `make release` (bdvmm, rdma-bridge, bd-kvmhost), the images (`images/build.sh`, with
//! BD_ROOTFS_IMAGE and a patched kernel with virtio-blk/net), and on this machine
//! `qemu-system-x86_64`, `iperf3` and `redis-benchmark` (Debian: qemu-system-x86, iperf3,
//! redis-tools), which are packed into the kvm host. Prints one line per measurement with every
//! VMM and the ratio bdvmm / QEMU. Nested figures are not hardware figures: read the ratios.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backdoors_tests::bench::{arg, iperf_gbits, key_values, redis_ping};
use backdoors_tests::child::Spawned;
use backdoors_tests::guestnet::GuestNet;
use backdoors_tests::kvmhost::{KvmHost, KvmHostOptions};
use backdoors_tests::site::Site;
use backdoors_tests::Images;

/// The benchmark disk inside the kvm host (tmpfs), the guest's `/dev/vdb`.
const BENCH_DISK: &str = "/tmp/bench-disk.img";
/// Guest size, the same for every VMM.
const GUEST_MIB: u32 = 512;
const GUEST_VCPUS: u32 = 1;
/// Boot from the VMM's start to `service up` (nested, from a disk).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The VMMs compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Bdvmm,
    Qemu,
    QemuKernelIrqchip,
    QemuBdFeatures,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Bdvmm => "bdvmm",
            Vmm::Qemu => "qemu",
            Vmm::QemuKernelIrqchip => "qemu-kirq",
            Vmm::QemuBdFeatures => "qemu-bdfeat",
        }
    }

    fn parse(s: &str) -> Vmm {
        match s {
            "bdvmm" => Vmm::Bdvmm,
            "qemu" => Vmm::Qemu,
            "qemu-kirq" => Vmm::QemuKernelIrqchip,
            "qemu-bdfeat" => Vmm::QemuBdFeatures,
            other => {
                panic!("--vmms: unknown VMM {other:?} (bdvmm, qemu, qemu-kirq, qemu-bdfeat)")
            }
        }
    }
}

/// One measurement: its label, and whether more is better (for reading the ratio).
struct Metric {
    key: &'static str,
    label: &'static str,
    higher_is_better: bool,
}

const METRICS: &[Metric] = &[
    Metric {
        key: "boot",
        label: "boot: VMM start -> service up (s)",
        higher_is_better: false,
    },
    Metric {
        key: "fio.seqread.MBps",
        label: "disk seq read 1M qd8 (MB/s)",
        higher_is_better: true,
    },
    Metric {
        key: "fio.seqwrite.MBps",
        label: "disk seq write 1M qd8 (MB/s)",
        higher_is_better: true,
    },
    Metric {
        key: "fio.randread.iops",
        label: "disk rand read 4k qd32 (IOPS)",
        higher_is_better: true,
    },
    Metric {
        key: "fio.randread1.iops",
        label: "disk rand read 4k qd1 (IOPS)",
        higher_is_better: true,
    },
    Metric {
        key: "fio.randread1.lat_p50_us",
        label: "disk rand read 4k qd1 latency p50 (us)",
        higher_is_better: false,
    },
    Metric {
        key: "fio.randread1.lat_p99_us",
        label: "disk rand read 4k qd1 latency p99 (us)",
        higher_is_better: false,
    },
    Metric {
        key: "iperf.host_to_guest",
        label: "net TCP host -> guest, iperf3 (Gbit/s)",
        higher_is_better: true,
    },
    Metric {
        key: "iperf.guest_to_host",
        label: "net TCP guest -> host, iperf3 (Gbit/s)",
        higher_is_better: true,
    },
    Metric {
        key: "ping.p50_us",
        label: "net ping-pong round trip p50 (us)",
        higher_is_better: false,
    },
    Metric {
        key: "ping.p99_us",
        label: "net ping-pong round trip p99 (us)",
        higher_is_better: false,
    },
    Metric {
        key: "ping.rps",
        label: "net ping-pong, 1 in flight (req/s)",
        higher_is_better: true,
    },
];

/// What one VMM's run gave.
#[derive(Default)]
struct Measured {
    values: BTreeMap<String, f64>,
    errors: Vec<String>,
}

/// The run's parameters.
struct Config {
    seconds: u32,
    pings: u32,
    disk_mib: u32,
}

fn num(name: &str, default: u32) -> u32 {
    arg(name)
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: {v:?} is not a number"))
        })
        .unwrap_or(default)
}

/// A program of this machine to carry into the kvm host.
fn host_program(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("no {name} on this machine: install the Debian package {package}")
        })
}

/// The guest's kernel command line: the root filesystem from `/dev/vda`, the network from `ip=`,
/// the iperf3 server on, the fio scenario on `/dev/vdb`.
fn guest_cmdline(cfg: &Config, net: &GuestNet) -> String {
    format!(
        "console=ttyS0 reboot=k panic=-1 quiet root=/dev/vda rw {} \
         bd.iperf3=yes bd.scenario=fio bd.fio_disk=vdb bd.fio_seconds={}",
        net.ip_param(),
        cfg.seconds
    )
}

/// The command line of `vmm` inside the kvm host.
fn vmm_argv(vmm: Vmm, cfg: &Config, net: &GuestNet) -> Vec<String> {
    let kernel = "/opt/bd/images/bzImage";
    let cmdline = guest_cmdline(cfg, net);
    let tap = &net.tap;
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    match vmm {
        Vmm::Bdvmm => {
            let mut a = s(&["/opt/bd/bin/bdvmm", "run", "--engine", "kvm"]);
            a.extend(s(&["--kernel", kernel, "--cmdline", &cmdline]));
            a.extend(s(&["--mem", &GUEST_MIB.to_string()]));
            a.extend(s(&["--vcpus", &GUEST_VCPUS.to_string()]));
            a.extend(s(&["--disk", "/dev/vda", "--disk", BENCH_DISK]));
            a.extend(s(&["--net", &net.net_arg()]));
            a
        }
        Vmm::Qemu | Vmm::QemuKernelIrqchip | Vmm::QemuBdFeatures => {
            // The virtio features bdvmm does not offer, off (see vmm/src/devices/net.rs and
            // block.rs): checksum and segmentation offloads, indirect descriptors.
            let (blk_extra, net_extra) = if vmm == Vmm::QemuBdFeatures {
                (
                    ",indirect_desc=off",
                    ",indirect_desc=off,csum=off,guest_csum=off,gso=off,guest_tso4=off,\
                     guest_tso6=off,guest_ecn=off,guest_ufo=off,host_tso4=off,host_tso6=off,\
                     host_ecn=off,host_ufo=off",
                )
            } else {
                ("", "")
            };
            let mut a = s(&["/opt/bd/bin/qemu-system-x86_64", "-L", "/opt/bd/share/qemu"]);
            // microvm's default is a split irqchip; the kernel's needs the second IOAPIC off.
            let machine = if vmm == Vmm::Qemu {
                "microvm"
            } else {
                "microvm,kernel-irqchip=on,ioapic2=off"
            };
            a.extend(s(&["-M", machine, "-accel", "kvm", "-cpu", "host"]));
            a.extend(s(&["-m", &format!("{GUEST_MIB}M")]));
            a.extend(s(&["-smp", &GUEST_VCPUS.to_string()]));
            a.extend(s(&["-nodefaults", "-no-user-config", "-display", "none"]));
            a.extend(s(&["-serial", "stdio", "-monitor", "none", "-no-reboot"]));
            a.extend(s(&["-kernel", kernel, "-append", &cmdline]));
            a.extend(s(&[
                "-drive",
                "id=root,file=/dev/vdb,format=raw,if=none",
                "-device",
                &format!("virtio-blk-device,drive=root{blk_extra}"),
                "-drive",
                &format!("id=bench,file={BENCH_DISK},format=raw,if=none"),
                "-device",
                &format!("virtio-blk-device,drive=bench{blk_extra}"),
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=on"),
                "-device",
                &format!("virtio-net-device,netdev=n0{net_extra}"),
            ]));
            a
        }
    }
}

/// The complete console lines of `proc` so far (a line still being written is left out),
/// without carriage returns.
fn lines(proc: &Spawned) -> Vec<String> {
    let out = proc.output();
    let complete = out.rfind('\n').map_or("", |i| &out[..i]);
    complete
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

/// The last 30 lines of `proc`'s output, for errors.
fn tail(proc: &Spawned) -> String {
    let l = lines(proc);
    l[l.len().saturating_sub(30)..].join("\n")
}

/// Waits until a line of `proc` contains one of `needles`; returns that line. An error if the
/// process ends first or `timeout` passes.
fn wait_any(proc: &mut Spawned, needles: &[&str], timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = lines(proc)
            .into_iter()
            .find(|l| needles.iter().any(|n| l.contains(n)))
        {
            return Ok(l);
        }
        if let Some(st) = proc.try_wait() {
            std::thread::sleep(Duration::from_millis(200));
            if let Some(l) = lines(proc)
                .into_iter()
                .find(|l| needles.iter().any(|n| l.contains(n)))
            {
                return Ok(l);
            }
            return Err(format!(
                "{} exited ({st}) before {needles:?}{}:\n{}",
                proc.what(),
                proc.failure()
                    .map(|f| format!(" ({f})"))
                    .unwrap_or_default(),
                tail(proc)
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{}: no {needles:?} within {timeout:?}:\n{}",
                proc.what(),
                tail(proc)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `argv` in the kvm host; its stdout if it succeeds.
fn run_in(host: &KvmHost, argv: &[&str], timeout: Duration) -> Result<String, String> {
    let (st, out, err) = host.run(argv, &[], timeout)?;
    if st.success() {
        Ok(out)
    } else {
        Err(format!(
            "{argv:?} failed ({st}): {}{}",
            out.trim(),
            err.trim()
        ))
    }
}

/// Boots the guest under `vmm` in `host` and measures it; it is stopped before returning.
fn measure(host: &KvmHost, net: &GuestNet, vmm: Vmm, cfg: &Config) -> Measured {
    let mut m = Measured::default();
    let guest_ip = net.guest_ip.as_str();
    let argv = vmm_argv(vmm, cfg, net);
    let t0 = Instant::now();
    let mut proc = host.spawn(&argv, vmm.name());
    let result = (|| -> Result<(), String> {
        wait_any(
            &mut proc,
            &["BACKDOORS: service up", "BACKDOORS: service down"],
            BOOT_TIMEOUT,
        )
        .and_then(|l| {
            if l.contains("service up") {
                Ok(())
            } else {
                Err(format!("a service failed:\n{}", tail(&proc)))
            }
        })?;
        m.values.insert("boot".into(), t0.elapsed().as_secs_f64());
        // Disk first, with the network idle.
        let fio_timeout = Duration::from_secs(120 + 12 * u64::from(cfg.seconds));
        let end = wait_any(&mut proc, &["FIO done", "FIO error"], fio_timeout)?;
        if end.contains("FIO error") {
            m.errors.push(format!(
                "{}: {end}\n--- console ---\n{}",
                vmm.name(),
                tail(&proc)
            ));
        }
        for l in lines(&proc) {
            let Some(rest) = l.split("FIO ").nth(1) else {
                continue;
            };
            let Some((job, kvs)) = rest.split_once(' ') else {
                continue;
            };
            for (k, v) in key_values(kvs) {
                m.values.insert(format!("fio.{job}.{k}"), v);
            }
        }
        // Network: the guest must answer first.
        run_in(
            host,
            &["ping", "-c", "3", "-W", "5", guest_ip],
            Duration::from_secs(30),
        )
        .map_err(|e| format!("the guest does not answer ping over {}: {e}", net.tap))?;
        let secs = cfg.seconds.to_string();
        let iperf_timeout = Duration::from_secs(60 + 2 * u64::from(cfg.seconds));
        for (key, reverse) in [
            ("iperf.host_to_guest", false),
            ("iperf.guest_to_host", true),
        ] {
            let mut a = vec!["/opt/bd/bin/iperf3", "-c", guest_ip, "-t", &secs, "-J"];
            if reverse {
                a.push("-R");
            }
            match run_in(host, &a, iperf_timeout).and_then(|out| iperf_gbits(&out)) {
                Ok(g) => {
                    m.values.insert(key.into(), g);
                }
                Err(e) => m.errors.push(format!("{}: {key}: {e}", vmm.name())),
            }
        }
        let pings = cfg.pings.to_string();
        let ping = run_in(
            host,
            &[
                "/opt/bd/bin/redis-benchmark",
                "-h",
                guest_ip,
                "-p",
                "6379",
                "-c",
                "1",
                "-n",
                &pings,
                "-t",
                "ping_mbulk",
                "--csv",
            ],
            Duration::from_secs(120),
        )
        .and_then(|out| redis_ping(&out));
        match ping {
            Ok((rps, p50, p99)) => {
                m.values.insert("ping.rps".into(), rps);
                m.values.insert("ping.p50_us".into(), p50);
                m.values.insert("ping.p99_us".into(), p99);
            }
            Err(e) => m.errors.push(format!("{}: ping-pong: {e}", vmm.name())),
        }
        Ok(())
    })();
    if let Err(e) = result {
        m.errors.push(format!("{}: {e}", vmm.name()));
    }
    if proc.terminate(Duration::from_secs(20)).is_none() {
        proc.crash();
    }
    m
}

/// Prepares the kvm host: the benchmark disk, and checks.
fn prepare(host: &KvmHost, cfg: &Config) {
    host.sh(
        &format!(
            "test -c /dev/vhost-net || {{ echo 'no /dev/vhost-net in the kvm host' >&2; exit 1; }}
             test -c /dev/net/tun || {{ echo 'no /dev/net/tun in the kvm host' >&2; exit 1; }}
             dd if=/dev/zero of={BENCH_DISK} bs=1M count={} 2>/dev/null",
            cfg.disk_mib
        ),
        &[],
    );
    let ver = host.sh("/opt/bd/bin/qemu-system-x86_64 --version | head -n1", &[]);
    println!("QEMU in the kvm host: {}", ver.trim());
}

fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn report(vmms: &[Vmm], results: &[(Vmm, Measured)]) {
    let get = |vmm: Vmm, key: &str| {
        results
            .iter()
            .find(|(v, _)| *v == vmm)
            .and_then(|(_, m)| m.values.get(key).copied())
    };
    let others: Vec<Vmm> = vmms.iter().copied().filter(|v| *v != Vmm::Bdvmm).collect();
    let mut head = format!("{:<42}", "measurement");
    for v in vmms {
        head.push_str(&format!(" {:>12}", v.name()));
    }
    if vmms.contains(&Vmm::Bdvmm) {
        for o in &others {
            head.push_str(&format!(" {:>18}", format!("bdvmm/{}", o.name())));
        }
    }
    println!("{head}  (better)");
    for metric in METRICS {
        let mut line = format!("{:<42}", metric.label);
        for v in vmms {
            line.push_str(&format!(" {:>12}", fmt_value(get(*v, metric.key))));
        }
        if vmms.contains(&Vmm::Bdvmm) {
            for o in &others {
                let ratio = match (get(Vmm::Bdvmm, metric.key), get(*o, metric.key)) {
                    (Some(b), Some(q)) if q > 0.0 => format!("{:.2}", b / q),
                    _ => "n/a".into(),
                };
                line.push_str(&format!(" {ratio:>18}"));
            }
        }
        line.push_str(if metric.higher_is_better {
            "  (higher)"
        } else {
            "  (lower)"
        });
        println!("{line}");
    }
    for (_, m) in results {
        for e in &m.errors {
            println!("error: {e}");
        }
    }
}

fn main() {
    let cfg = Config {
        seconds: num("--seconds", 5).max(1),
        pings: num("--pings", 2_000).max(100),
        disk_mib: num("--disk-mib", 256).max(16),
    };
    let vmms: Vec<Vmm> = arg("--vmms")
        .unwrap_or_else(|| "bdvmm,qemu,qemu-kirq,qemu-bdfeat".into())
        .split(',')
        .map(Vmm::parse)
        .collect();
    let img = Images::load();
    let rootfs = img.get("BD_ROOTFS_IMAGE").to_path_buf();
    let kernel = img.get("BD_KERNEL_BZIMAGE");
    println!(
        "--- devices: bdvmm kvm engine vs QEMU -accel kvm (-M microvm), both virtio-mmio, \
         nested in one kvm host"
    );
    println!(
        "guest: {} MiB, {} vCPU, kernel {}, root {} (copy-on-write per VMM); \
         {} s per fio job and iperf3 run, {} pings",
        GUEST_MIB,
        GUEST_VCPUS,
        kernel.display(),
        rootfs.display(),
        cfg.seconds,
        cfg.pings
    );
    let opts = KvmHostOptions {
        // /dev/vda for bdvmm, /dev/vdb for QEMU: each VMM writes its own copy.
        disks: vec![rootfs.clone(), rootfs],
        extra_bins: vec![
            host_program("iperf3", "iperf3"),
            host_program("redis-benchmark", "redis-tools"),
        ],
        qemu: vmms.iter().any(|v| *v != Vmm::Bdvmm),
        ..KvmHostOptions::default()
    };
    let t0 = Instant::now();
    let site = Arc::new(Site::Kvm(
        KvmHost::start(&opts).unwrap_or_else(|e| panic!("{e}")),
    ));
    let host = site.kvm().expect("a kvm host");
    prepare(host, &cfg);
    // One tap in the kvm host for every VMM in turn (each releases it when it exits).
    let net = GuestNet::new(&site);
    let mut results = Vec::new();
    for vmm in &vmms {
        eprintln!("devices bench: {} ...", vmm.name());
        let m = measure(host, &net, *vmm, &cfg);
        results.push((*vmm, m));
    }
    report(&vmms, &results);
    println!("(whole run {:.0} s)", t0.elapsed().as_secs_f64());
}
