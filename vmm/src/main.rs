//! `bdvmm`: boot a Linux microVM on a shared memfd, with a pause lock for remote healers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use bdvmm::api::server::{AccessPolicy, ApiServer};
use bdvmm::api::ApiClient;
use bdvmm::bootfiles;
use bdvmm::config::VmConfig;
use bdvmm::console::Console;
use bdvmm::devices::bus::DiskSpec;
use bdvmm::devices::setup::{check_disks, check_taps, MmioDevices};
use bdvmm::devices::tap::NetSpec;
use bdvmm::engine::kvm::boot::{BootSpec, CMDLINE_MAX};
use bdvmm::engine::kvm::KvmEngine;
use bdvmm::engine::tcg::{TcgEngine, TcgSpec};
use bdvmm::engine::{Engine, EngineKind, OnPanic, OnReset, VmExit};
use bdvmm::inspect;
use bdvmm::layout::{MemoryLayout, MAX_VCPUS};
use bdvmm::memory::GuestRam;
use bdvmm::vmm::Vmm;

/// Exit status for bad input or set-up failures (as clap uses for usage errors).
const EXIT_SETUP: u8 = 2;
/// Exit status when the guest or its engine failed.
const EXIT_GUEST_FAILED: u8 = 1;

const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
const DEFAULT_MEM_MIB: u64 = 512;
const DEFAULT_LEASE_MS: u64 = 2000;

#[derive(Parser)]
#[command(
    name = "bdvmm",
    version,
    about = "Backdoors microVM monitor: boots a Linux guest whose RAM is a shared memfd, with a pause lock for remote healers",
    long_about = "bdvmm boots a Linux kernel (bzImage or vmlinux) and initramfs as a microVM. Guest RAM is one \
memfd owned by bdvmm; a control API on a Unix socket lets a local client pause every vCPU under a \
lease, read registers and map guest memory. Two engines run the vCPUs: kvm (rust-vmm, the product) \
and tcg (a QEMU TCG child on the same memfd, for hosts whose KVM cannot run a stock kernel).\n\n\
Exit status: 0 when the guest powers off (or reboots, unless --on-reset restart), 1 when the \
guest panics or its engine fails, 2 for bad input."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and run it until it powers off.
    Run(Box<RunArgs>),
    /// Talk to a running bdvmm's control API and print its JSON reply.
    Ctl(CtlArgs),
}

#[derive(Parser)]
struct RunArgs {
    /// A VM config file (TOML) with any of: kernel, initrd, cmdline, mem_mib, vcpus, engine, api,
    /// lease_ms, on_reset, on_panic, console_log, [[disk]] tables (path, read_only) and [[net]] tables
    /// (tap, mac). Flags given here win over the file; --disk and --net replace the file's
    /// lists. Relative paths are relative to the file's directory. The README's bdvmm section
    /// has an example.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Guest kernel: a bzImage or an uncompressed ELF vmlinux (PVH entry if it has the note).
    /// Required, here or in --config.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line; bdvmm appends `memmap=` and `backdoor.sb=` for the backdoor range.
    /// [default: "console=ttyS0 reboot=k panic=-1"]
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest RAM in MiB [default: 512].
    #[arg(long)]
    mem: Option<u64>,
    /// Number of vCPUs (1-32) [default: 1].
    #[arg(long)]
    vcpus: Option<u8>,
    /// Engine: kvm needs hardware virtualization; auto picks kvm only where /proc/cpuinfo shows
    /// vmx/svm [default: auto].
    #[arg(long, value_enum)]
    engine: Option<EngineKind>,
    /// Control API Unix socket (pause/resume/regs/memory/status). Created mode 0600 (0660 with
    /// --api-group) whatever the umask; every client's uid/gid is checked (SO_PEERCRED) against
    /// bdvmm's own uid, root and the --api-allow-*/--api-readonly-* lists, others are refused.
    #[arg(long)]
    api: Option<PathBuf>,
    /// Also give these uids full API access (pause, resume, reset, the read-write memfd).
    /// Repeat the flag or separate by commas. bdvmm's own uid and root always have it.
    #[arg(long, value_delimiter = ',')]
    api_allow_uid: Vec<u32>,
    /// Also give full API access to clients whose primary gid is one of these.
    #[arg(long, value_delimiter = ',')]
    api_allow_gid: Vec<u32>,
    /// Give these uids read-only API access: status, regs and a read-only memfd (a writable
    /// shared mapping of it fails); pause, resume and reset are refused.
    #[arg(long, value_delimiter = ',')]
    api_readonly_uid: Vec<u32>,
    /// Give read-only API access to clients whose primary gid is one of these.
    #[arg(long, value_delimiter = ',')]
    api_readonly_gid: Vec<u32>,
    /// Make the API socket group-owned by this gid and mode 0660 (else 0600), so that clients
    /// of another uid admitted above can reach it.
    #[arg(long)]
    api_group: Option<u32>,
    /// Default pause lease in milliseconds: a pause not renewed or released by then is undone
    /// [default: 2000].
    #[arg(long)]
    lease_ms: Option<u64>,
    /// Also copy the serial console to this file.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Do not copy the serial console to stdout.
    #[arg(long)]
    no_console_stdout: bool,
    /// KVM device for the kvm engine.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// What a guest reboot does: `exit` ends bdvmm with status 0 (as a poweroff does), `restart`
    /// boots the guest again in place (same kernel, initrd and command line, same memory, every
    /// vCPU in its boot state). The API's `reset` restarts the guest either way [default: exit].
    #[arg(long, value_enum)]
    on_reset: Option<OnReset>,
    /// What a guest kernel panic does: `exit` ends the VM (status 1, naming the panic); `keep`
    /// logs it and keeps the VM, so that its memory stays reachable through the API and the
    /// bridge for a monitor to recover the guest's state (boot the kernel with `panic=0`)
    /// [default: exit].
    #[arg(long, value_enum)]
    on_panic: Option<OnPanic>,
    /// A virtio-blk disk on a raw image: `PATH` (read-write, locked against any other writer)
    /// or `PATH,ro` (read-only, shared with other readers). Repeat for more disks; the first is
    /// the guest's `/dev/vda` (boot from it with `--cmdline "... root=/dev/vda rw"`). The kvm
    /// engine serves it over virtio-mmio (described in the ACPI DSDT); the tcg engine gives it
    /// to QEMU as virtio-blk-pci. The guest kernel needs virtio-blk (and virtio-mmio or
    /// virtio-pci) built in or loaded by its initramfs.
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<DiskSpec>,
    /// A virtio-net device on an existing host tap: `tap=NAME[,mac=MAC]`. bdvmm never creates
    /// taps: make one first (`ip tuntap add NAME mode tap user $USER`, `ip link set NAME up`,
    /// then bridge or route it). The MAC defaults to a locally administered address derived
    /// from the tap name. Repeat for more devices. The kvm engine serves it over virtio-mmio with
    /// the kernel's vhost-net moving the packets (needs `/dev/vhost-net`: modprobe vhost_net);
    /// the tcg engine gives the tap to QEMU as virtio-net-pci. The guest kernel needs virtio-net.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    nets: Vec<NetSpec>,
    /// QEMU binary for the tcg engine.
    #[arg(long, default_value = "qemu-system-x86_64", env = "BDVMM_QEMU")]
    qemu: String,
}

#[derive(Parser)]
struct CtlArgs {
    /// The bdvmm control socket.
    #[arg(long)]
    api: PathBuf,
    #[command(subcommand)]
    op: CtlOp,
}

#[derive(Subcommand)]
enum CtlOp {
    /// VM status.
    Status,
    /// Pause the guest, hold it for --hold-ms, then exit (which resumes it).
    Pause {
        /// Lease in milliseconds.
        #[arg(long)]
        lease_ms: Option<u64>,
        /// How long to keep the guest paused before exiting.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
    /// Resume (only the lease holder can; mostly useful to see the refusal).
    Resume,
    /// Restart the guest in place: it boots again from the same kernel on the same memory.
    Reset,
    /// Registers of a vCPU.
    Regs {
        /// vCPU index.
        #[arg(long, default_value_t = 0)]
        vcpu: u8,
    },
    /// The guest-physical memory map (the memfd itself only reaches programs using the API).
    Memory,
    /// The guest's process table, by introspection (pauses the guest briefly).
    Ps {
        /// System.map of the guest kernel: an optional override for a stock guest (by default
        /// its symbols are found in its memory; patched guests need none).
        #[arg(long, requires = "vmlinux")]
        system_map: Option<PathBuf>,
        /// The guest kernel's vmlinux, for its BTF: the override's other half.
        #[arg(long, requires = "system_map")]
        vmlinux: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The guest's Sensor Box (patched guests), or the virtual sensors of a stock guest computed
    /// from its kernel's own counters.
    Sb {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BDVMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in a log file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Ctl(args) => {
            die_quietly_when_stdout_closes();
            ctl(args)
        }
    }
}

/// A command that prints for a shell (`… | head`) dies of SIGPIPE, quietly, when its reader goes
/// away — as Unix tools do — instead of panicking in `println!` (Rust ignores SIGPIPE). Not for
/// `run`, whose stdout is the guest's console: a VM must outlive its console's reader.
fn die_quietly_when_stdout_closes() {
    // SAFETY: restores the default disposition of one signal; no handler is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("bdvmm: error: {msg}");
    ExitCode::from(code)
}

/// What `run` boots: the flags over the config file over the defaults.
struct Settings {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    mem: u64,
    vcpus: u8,
    engine: EngineKind,
    api: Option<PathBuf>,
    lease_ms: u64,
    on_reset: OnReset,
    on_panic: OnPanic,
    console_log: Option<PathBuf>,
    disks: Vec<DiskSpec>,
    nets: Vec<NetSpec>,
}

/// Why the flags and the config file do not make a VM.
#[derive(Debug, thiserror::Error)]
enum SettingsError {
    #[error(transparent)]
    Config(#[from] bdvmm::config::ConfigError),
    #[error("no kernel: give --kernel PATH, or kernel = \"PATH\" in the --config file")]
    NoKernel,
    #[error("the --config file's [[net]]: {0}")]
    Net(#[from] bdvmm::devices::tap::NetSpecError),
}

impl Settings {
    fn resolve(args: &RunArgs) -> Result<Self, SettingsError> {
        let file = match &args.config {
            Some(p) => VmConfig::load(p)?,
            None => VmConfig::default(),
        };
        let kernel = args
            .kernel
            .clone()
            .or(file.kernel.clone())
            .ok_or(SettingsError::NoKernel)?;
        Ok(Self {
            kernel,
            initrd: args.initrd.clone().or(file.initrd.clone()),
            cmdline: args
                .cmdline
                .clone()
                .or(file.cmdline.clone())
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_owned()),
            mem: args.mem.or(file.mem_mib).unwrap_or(DEFAULT_MEM_MIB),
            vcpus: args.vcpus.or(file.vcpus).unwrap_or(1),
            engine: args.engine.or(file.engine).unwrap_or(EngineKind::Auto),
            api: args.api.clone().or(file.api.clone()),
            lease_ms: args.lease_ms.or(file.lease_ms).unwrap_or(DEFAULT_LEASE_MS),
            on_reset: args.on_reset.or(file.on_reset).unwrap_or_default(),
            on_panic: args.on_panic.or(file.on_panic).unwrap_or_default(),
            console_log: args.console_log.clone().or(file.console_log.clone()),
            disks: if args.disks.is_empty() {
                file.disk_specs()
            } else {
                args.disks.clone()
            },
            nets: if args.nets.is_empty() {
                file.net_specs()?
            } else {
                args.nets.clone()
            },
        })
    }
}

fn run(args: RunArgs) -> ExitCode {
    let set = match Settings::resolve(&args) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_SETUP, e),
    };
    // Validate everything the user gave before touching KVM or QEMU.
    let layout = match MemoryLayout::new(set.mem) {
        Ok(l) => l,
        Err(e) => return fail(EXIT_SETUP, e),
    };
    if !(1..=MAX_VCPUS).contains(&set.vcpus) {
        return fail(
            EXIT_SETUP,
            format!(
                "--vcpus {} is out of range: give 1 to {MAX_VCPUS}",
                set.vcpus
            ),
        );
    }
    if !bdvmm::api::protocol::LEASE_MS_RANGE.contains(&set.lease_ms) {
        return fail(
            EXIT_SETUP,
            format!(
                "--lease-ms {} is out of range: give 1 to 600000",
                set.lease_ms
            ),
        );
    }
    let format = match bootfiles::kernel_format(&set.kernel) {
        Ok(f) => f,
        Err(e) => return fail(EXIT_SETUP, e),
    };
    if let Some(initrd) = &set.initrd {
        if let Err(e) = bootfiles::check_initrd(initrd) {
            return fail(EXIT_SETUP, e);
        }
    }
    let cmdline = format!("{} {}", set.cmdline.trim(), layout.cmdline_params());
    if cmdline.len() >= CMDLINE_MAX {
        return fail(
            EXIT_SETUP,
            format!(
                "kernel command line is {} bytes; x86 Linux takes at most {}",
                cmdline.len(),
                CMDLINE_MAX - 1
            ),
        );
    }
    if cmdline.bytes().any(|b| b == 0 || b == b'\n') {
        return fail(
            EXIT_SETUP,
            "kernel command line may not contain NUL or newline",
        );
    }
    let api = match &set.api {
        Some(p) => match ApiServer::bind_with(p, access_policy(&args)) {
            Ok(s) => Some(s),
            Err(e) => return fail(EXIT_SETUP, e),
        },
        None => None,
    };
    let log = match &set.console_log {
        Some(p) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            Ok(f) => Some(f),
            Err(e) => {
                return fail(
                    EXIT_SETUP,
                    format!("cannot open --console-log {}: {e}", p.display()),
                )
            }
        },
        None => None,
    };
    let console = match Console::new(!args.no_console_stdout, log) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_SETUP, format!("cannot set up the console: {e}")),
    };
    let (kind, why) = set.engine.resolve();
    eprintln!(
        "bdvmm: engine {} -> {} ({why})",
        set.engine.name(),
        kind.name()
    );
    eprintln!("bdvmm: cmdline: {cmdline}");
    let ram = match GuestRam::new(layout) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_SETUP, e),
    };
    let engine: Box<dyn Engine> = match kind {
        EngineKind::Kvm => {
            let spec = BootSpec {
                kernel: set.kernel.clone(),
                format,
                initrd: set.initrd.clone(),
                cmdline: cmdline.clone(),
                vcpus: set.vcpus,
                acpi_devices: Vec::new(),
            };
            let devices = match MmioDevices::build(&set.disks, &set.nets, &ram.mem) {
                Ok(d) => d,
                Err(e) => return fail(EXIT_SETUP, e),
            };
            match KvmEngine::new(
                &ram,
                spec,
                console.clone(),
                &args.kvm_device,
                set.on_reset,
                devices,
            ) {
                Ok(e) => Box::new(e),
                Err(e) => return fail(EXIT_SETUP, e),
            }
        }
        EngineKind::Tcg | EngineKind::Auto => {
            let spec = TcgSpec {
                qemu: &args.qemu,
                kernel: &set.kernel,
                initrd: set.initrd.as_deref(),
                cmdline: &cmdline,
                vcpus: set.vcpus,
                on_reset: set.on_reset,
                disks: &set.disks,
                nets: &set.nets,
            };
            if let Err(e) = check_disks(&set.disks) {
                return fail(EXIT_SETUP, e);
            }
            if let Err(e) = check_taps(&set.nets) {
                return fail(EXIT_SETUP, e);
            }
            match TcgEngine::new(&ram, &spec, console.clone()) {
                Ok(e) => Box::new(e),
                Err(e) => return fail(EXIT_SETUP, e),
            }
        }
    };
    // Stdin goes to the guest's serial port only when a person is typing.
    // SAFETY: isatty on a constant fd.
    let forward_stdin = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
    let vmm = match Vmm::new(
        engine,
        ram,
        console,
        api,
        Duration::from_millis(set.lease_ms),
        cmdline,
        forward_stdin,
    ) {
        Ok(v) => v.with_on_panic(set.on_panic),
        Err(e) => return fail(EXIT_SETUP, format!("cannot set up the event loop: {e}")),
    };
    match vmm.run() {
        VmExit::Shutdown(reason) => {
            eprintln!("bdvmm: guest stopped: {reason}");
            ExitCode::SUCCESS
        }
        VmExit::Failed(reason) => fail(EXIT_GUEST_FAILED, reason),
    }
}

/// Who may use the API socket, from the command line.
fn access_policy(args: &RunArgs) -> AccessPolicy {
    let mut policy = AccessPolicy::owner_and_root();
    policy.uids.extend(&args.api_allow_uid);
    policy.gids.extend(&args.api_allow_gid);
    policy.readonly_uids.extend(&args.api_readonly_uid);
    policy.readonly_gids.extend(&args.api_readonly_gid);
    policy.socket_group = args.api_group;
    policy
}

/// A control-API reply as JSON to print.
fn json<T: serde::Serialize>(
    v: Result<T, bdvmm::api::ApiError>,
) -> Result<Option<serde_json::Value>, inspect::InspectError> {
    v.map_err(inspect::InspectError::from)
        .map(|r| Some(serde_json::to_value(r).unwrap_or_default()))
}

fn ctl(args: CtlArgs) -> ExitCode {
    let mut client = match ApiClient::connect(&args.api) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_SETUP, e),
    };
    let out = match args.op {
        CtlOp::Status => json(client.status()),
        CtlOp::Pause { lease_ms, hold_ms } => {
            let r = client.pause(lease_ms.map(Duration::from_millis));
            if r.is_ok() && hold_ms > 0 {
                std::thread::sleep(Duration::from_millis(hold_ms));
            }
            json(r)
        }
        CtlOp::Resume => json(client.resume()),
        CtlOp::Reset => json(client.reset().map(|()| serde_json::json!({"ok": true}))),
        CtlOp::Regs { vcpu } => json(client.regs(vcpu)),
        CtlOp::Memory => json(client.memory().map(|(_, r)| r)),
        CtlOp::Ps {
            system_map,
            vmlinux,
            json: as_json,
        } => inspect::process_table(&mut client, system_map.as_deref(), vmlinux.as_deref()).map(
            |t| {
                if t.forced {
                    eprintln!(
                        "bdvmm: warning: tasklist_lock stayed write-held through {} pauses; the table was read anyway and may be inconsistent",
                        t.attempts
                    );
                }
                if as_json {
                    Some(serde_json::to_value(&t.value).unwrap_or_default())
                } else {
                    introspect::show::print_process_table(&t.value);
                    None
                }
            },
        ),
        CtlOp::Sb { json: as_json } => inspect::map_guest(&mut client)
            .and_then(|(mem, range)| inspect::sensor_box(&mut client, &mem, range))
            .map(|sb| {
                if as_json {
                    Some(serde_json::to_value(&sb).unwrap_or_default())
                } else {
                    introspect::show::print_sensor_box(&sb);
                    None
                }
            }),
    };
    match out {
        Ok(Some(v)) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_GUEST_FAILED, e),
    }
}
