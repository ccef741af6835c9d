//! `bd-kvmhost`: boot a kvm host (a QEMU-TCG VM with emulated AMD-V, where bdvmm's kvm engine
//! runs Linux guests on machines whose own KVM cannot), run programs in it, and — inside it — the
//! agent that does so. Used by the end-to-end tests, the benchmarks and `make demo ENGINE=kvm`.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backdoors_tests::kvmhost::remote::RemoteChild;
use backdoors_tests::kvmhost::{agent, freeze, proto, KvmHost, KvmHostOptions};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bd-kvmhost",
    version,
    about = "Boot a kvm host (QEMU TCG, -cpu max: emulated AMD-V with nested paging) and run programs in it",
    long_about = "A kvm host is a QEMU-TCG VM running the stock Debian kernel with kvm-amd, booted from \
images/kvmhost (cached) plus a per-run archive with this checkout's release binaries (bdvmm, rdma-bridge, \
bd-kvmhost) and the guest images under /opt/bd. It is reached over a tap device (10.232.N.2, this \
machine 10.232.N.1); an agent inside runs programs for `bd-kvmhost exec`. Needs root (tap), \
`make images` and `make release`."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a kvm host, print `bd-kvmhost: ready ip=<addr> agent=<addr:port>`, and keep it up
    /// until SIGINT or SIGTERM (its console goes to stderr).
    Up {
        /// RAM in MiB.
        #[arg(long, default_value_t = 3072)]
        mem: u64,
        /// vCPUs.
        #[arg(long, default_value_t = 2)]
        smp: u8,
    },
    /// Run a program inside a kvm host; its output and exit status are this command's.
    Exec {
        /// The agent's address, as `up` printed it.
        #[arg(long)]
        agent: SocketAddr,
        /// Read this command's stdin to its end first and give it to the program (else the
        /// program's stdin is empty).
        #[arg(long)]
        stdin: bool,
        /// Program and arguments.
        #[arg(required = true, trailing_var_arg = true)]
        argv: Vec<String>,
    },
    /// Freeze the threads named PREFIX* of one process (default: bdvmm's vCPU threads) and only
    /// those, as a halted CPU would be: a detached tracer ptrace-stops each one (a stop signal
    /// would stop the whole process, bdvmm's API and bridge with it). Prints
    /// `frozen tracer=<pid> threads=<n>` once they are all stopped; `kill -KILL <pid>` (the pid
    /// is also written to --pidfile) lets them go on.
    FreezeThreads {
        /// The process's name (comm).
        #[arg(long, default_value = "bdvmm")]
        comm: String,
        /// A string its command line contains (e.g. its API socket's path).
        #[arg(long)]
        cmdline: String,
        /// The threads' name prefix.
        #[arg(long, default_value = "vcpu")]
        prefix: String,
        /// Where the tracer writes its pid.
        #[arg(long)]
        pidfile: std::path::PathBuf,
    },
    /// (Inside a kvm host.) Serve the agent protocol.
    Agent {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:7000")]
        listen: String,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);
/// How long `exec` waits for its program to end after passing on a SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_stop_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Agent { listen } => match agent::serve(&listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bd-kvmhost agent: cannot listen on {listen}: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Up { mem, smp } => up(mem, smp),
        Cmd::FreezeThreads {
            comm,
            cmdline,
            prefix,
            pidfile,
        } => {
            let frozen = freeze::find_process(&comm, &cmdline).and_then(|pid| {
                let tids = freeze::threads(pid, &prefix)?;
                freeze::freeze_detached(&tids, &pidfile).map(|tracer| (tracer, tids.len()))
            });
            match frozen {
                Ok((tracer, n)) => {
                    println!("frozen tracer={tracer} threads={n}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("bd-kvmhost freeze-threads: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Exec { agent, stdin, argv } => exec(agent, stdin, &argv),
    }
}

fn up(mem: u64, smp: u8) -> ExitCode {
    install_stop_handlers();
    let host = match KvmHost::start(&KvmHostOptions {
        mem_mib: mem,
        smp,
        ..KvmHostOptions::default()
    }) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("bd-kvmhost: error: {e}");
            return ExitCode::from(1);
        }
    };
    println!("bd-kvmhost: ready ip={} agent={}", host.ip, host.agent());
    let _ = std::io::stdout().flush();
    let mut shown = 0;
    while !STOP.load(Ordering::SeqCst) {
        let console = host.console();
        if console.len() > shown {
            eprint!("{}", &console[shown..]);
            shown = console.len();
        }
        if !host.alive() {
            eprintln!("bd-kvmhost: the kvm host stopped");
            return ExitCode::from(1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("bd-kvmhost: stopping the kvm host");
    ExitCode::SUCCESS
}

fn exec(agent: SocketAddr, with_stdin: bool, argv: &[String]) -> ExitCode {
    install_stop_handlers();
    let mut input = Vec::new();
    if with_stdin {
        use std::io::Read;
        if let Err(e) = std::io::stdin()
            .take(proto::MAX_STDIN + 1)
            .read_to_end(&mut input)
        {
            eprintln!("bd-kvmhost: cannot read stdin: {e}");
            return ExitCode::from(1);
        }
        if input.len() as u64 > proto::MAX_STDIN {
            eprintln!(
                "bd-kvmhost: stdin is larger than {} MiB",
                proto::MAX_STDIN >> 20
            );
            return ExitCode::from(2);
        }
    }
    let child = match RemoteChild::spawn(agent, argv, &[], &input) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bd-kvmhost: cannot reach the agent at {agent}: {e}");
            return ExitCode::from(1);
        }
    };
    let (mut out_at, mut err_at) = (0, 0);
    let mut flush = |child: &RemoteChild| {
        let (o, e) = (child.output.stdout(), child.output.stderr());
        print!("{}", &o[out_at..]);
        eprint!("{}", &e[err_at..]);
        let _ = std::io::stdout().flush();
        (out_at, err_at) = (o.len(), e.len());
    };
    let mut signalled: Option<std::time::Instant> = None;
    loop {
        flush(&child);
        if let Some(st) = child.try_wait() {
            std::thread::sleep(Duration::from_millis(50));
            flush(&child);
            if let Some(f) = child.failure() {
                eprintln!("bd-kvmhost: {f}");
            }
            use std::os::unix::process::ExitStatusExt;
            return ExitCode::from(match (st.code(), st.signal()) {
                // The low byte, as a shell reports it (statuses are 0..=255, signals 1..=64).
                (Some(c), _) => c.to_le_bytes()[0],
                (None, Some(s)) => (128 + s).to_le_bytes()[0],
                _ => 1,
            });
        }
        if STOP.load(Ordering::SeqCst) {
            match signalled {
                None => {
                    child.signal(libc::SIGTERM);
                    signalled = Some(std::time::Instant::now());
                }
                // The kvm host may be gone (then nothing ever answers): do not wait for it.
                Some(t) if t.elapsed() > STOP_GRACE => {
                    eprintln!("bd-kvmhost: no answer from the kvm host after SIGTERM; leaving");
                    return ExitCode::from(143);
                }
                Some(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
