//! bdmon's configuration (TOML).
//!
//! ```toml
//! sample_ms = 10                   # Sensor Box sampling period (1 ms and up)
//! events = "events.jsonl"          # JSON-lines event log ("-": standard output)
//! metrics = "127.0.0.1:9464"       # Prometheus text on GET /metrics (optional)
//! dry_run = false                  # diagnose and log what would be killed, kill nothing
//! spare_users = [1001]             # never killed by any healer (root always is spared)
//! pause_budget_percent = 1.0       # pause bdmon may cost a guest outside repairs, in % of ...
//! pause_budget_window_s = 60       # ... any sliding window of this many seconds
//! retry_min_ms = 1000              # a failing step (connect, locate, sample, heal) is retried
//! retry_max_ms = 60000             # after 1 s, 2 s, 4 s ... up to this; reset on success
//!
//! [proc]                           # Proc_Repair_Healer (NPROCS, MAXPROC_RATE_PERUID)
//! policies = ["RATE_TOO_HIGH", "TOO_MANY_PROCS", "TREE_TOO_DEEP"]   # tried in order
//! rate_threshold = 100             # forks/s for RATE_TOO_HIGH (default: the sensor's threshold)
//!
//! [mem]                            # Mem_Reclaim_Healer (OOM_KILLER_RUNNING, FREE_PAGES)
//! policy = "MAX_RSSUID_SAVEUID"    # MAX_RSS | MAX_RSSUID | MAX_RSSUID_SAVEUID
//! save_users = [1002]              # spared by MAX_RSSUID_SAVEUID
//! min_culprit_mb = 64              # a user holding less is never a memory culprit
//!
//! [cpu]                            # CPU_Share_Healer (NR_RUNNING): one user starves the rest
//! action = "renice"                # renice | stop | kill (stop and renice: patched kernels)
//! max_share = 0.75                 # a user using more of the CPU time than this is the culprit
//! window_ms = 500                  # CPU time is measured over this window (two walks)
//! nice = 19                        # for action = "renice"
//! resume_after_s = 300             # action = "stop": SIGCONT after this long (0: never)
//!
//! [hang]                           # progress sensors stalled while the vCPUs run
//! action = "report"                # report | command | restart (through the bridge and bdvmm)
//! command = ["/usr/local/bin/restart-vm", "{guest}"]   # for action = "command"
//! min_stall_ms = 3000              # and stalled at least this long (besides the sensor's T)
//! free_cpu = "stop"                # a task holding a CPU while ticks advance: stop | kill | off
//! free_root = false                # may free_cpu act on a root process?
//! min_hold_ms = 2000               # the task must have held its CPU this long
//!
//! [[guest]]
//! name = "vm1"
//! bridge = "10.0.0.1:7070"
//! pki = "pki"                      # ca.pem, MONITOR.pem, MONITOR.key
//! monitor = "mon1"
//! # stock kernels (virtual sensors): system_map = "...", vmlinux = "..."
//! lease_ms = 2000                  # pause lease while healing; kills stop in its last quarter
//! walk_entries = 65536             # most task_structs one task-list walk takes (tasks + threads)
//! walk_ms = 1000                   # longest one walk may take
//! # pause_budget_percent = 0.5     # this guest's own budget (default: the one above)
//! [guest.thresholds]               # override the guest's thresholds, by sensor name (also
//!                                  # "NET_RX:eth0" and "NET_IRQS:eth0", per device)
//! NPROCS = 300
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors reading the config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable.
    #[error("cannot read config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Bad TOML or fields.
    #[error("config {path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// Values that make no sense.
    #[error("config: {0}")]
    Invalid(String),
}

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Sampling period in milliseconds.
    #[serde(default = "default_sample_ms")]
    pub sample_ms: u64,
    /// Event log path, or "-".
    #[serde(default = "default_events")]
    pub events: String,
    /// Prometheus listen address.
    #[serde(default)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Diagnose only.
    #[serde(default)]
    pub dry_run: bool,
    /// Users no healer ever kills.
    #[serde(default)]
    pub spare_users: Vec<u32>,
    /// The guest time bdmon may hold paused outside an actual repair, in percent of any sliding
    /// `pause_budget_window_s` (see [`crate::budget`]).
    #[serde(default = "default_budget_percent")]
    pub pause_budget_percent: f64,
    /// The budget's sliding window, in seconds.
    #[serde(default = "default_budget_window_s")]
    pub pause_budget_window_s: u64,
    /// First delay before a failing step is tried again (ms); it doubles at each failure.
    #[serde(default = "default_retry_min_ms")]
    pub retry_min_ms: u64,
    /// Longest delay between two tries of a failing step (ms).
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// Proc_Repair_Healer.
    #[serde(default)]
    pub proc: ProcConfig,
    /// Mem_Reclaim_Healer.
    #[serde(default)]
    pub mem: MemConfig,
    /// CPU_Share_Healer.
    #[serde(default)]
    pub cpu: CpuConfig,
    /// Hang detection.
    #[serde(default)]
    pub hang: HangConfig,
    /// The guests.
    #[serde(rename = "guest", default)]
    pub guests: Vec<GuestConfig>,
    /// `[fleet]`: guests found in etcd (in addition to any `[[guest]]`), divided among the
    /// monitors of the fleet.
    #[serde(default)]
    pub fleet: Option<FleetSection>,
}

/// `[fleet]`: where etcd is, who this monitor is, and how many monitors each guest gets.
///
/// ```toml
/// [fleet]
/// endpoints = ["127.0.0.1:2379"]   # etcd client URLs
/// prefix = "/backdoors"            # the fleet's keys
/// ttl_s = 5                        # lease TTL: a dead monitor's guests move this long after
/// connect_timeout_ms = 2000        # one etcd connection attempt or request
/// monitor = "mon1"                 # this monitor's name (its HELLO and member key)
/// pki = "pki"                      # where mon1.pem / mon1.key / ca.pem are
/// monitors_per_guest = 2           # k: each guest is watched by this many monitors
/// sample_ms = 10                   # optional: the fleet guests' sampling period
/// lease_ms = 2000                  # optional: as a [[guest]]'s (pause lease while healing)
/// walk_ms = 1000                   # optional: as a [[guest]]'s (longest task-list walk)
/// walk_entries = 100000            # optional: as a [[guest]]'s (most task_structs per walk)
/// [fleet.thresholds]               # optional: threshold overrides for every fleet guest
/// NPROCS = 300
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// etcd client endpoints.
    #[serde(default = "fleet::config::default_endpoints")]
    pub endpoints: Vec<String>,
    /// Key prefix.
    #[serde(default = "fleet::config::default_prefix")]
    pub prefix: String,
    /// Lease TTL in seconds.
    #[serde(default = "fleet::config::default_ttl_s")]
    pub ttl_s: u64,
    /// Connect and request timeout in milliseconds.
    #[serde(default = "fleet::config::default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// This monitor's name.
    pub monitor: String,
    /// Its PKI directory.
    pub pki: PathBuf,
    /// The name the bridges' certificates carry.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// Monitors per guest.
    #[serde(default = "one")]
    pub monitors_per_guest: usize,
    /// Sample period of the fleet's guests, in milliseconds (the file's `sample_ms` if absent).
    #[serde(default)]
    pub sample_ms: Option<u64>,
    /// Threshold overrides for every fleet guest (as a `[[guest]]`'s `thresholds`).
    #[serde(default)]
    pub thresholds: BTreeMap<String, u64>,
    /// Every fleet guest's pause lease while healing (as a `[[guest]]`'s `lease_ms`).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Every fleet guest's walk bound in task_structs (as a `[[guest]]`'s `walk_entries`).
    #[serde(default = "default_walk_entries")]
    pub walk_entries: usize,
    /// Every fleet guest's walk bound in ms (as a `[[guest]]`'s `walk_ms`).
    #[serde(default = "default_walk_ms")]
    pub walk_ms: u64,
}

fn one() -> usize {
    1
}

impl FleetSection {
    /// The etcd side.
    pub fn fleet_config(&self) -> fleet::FleetConfig {
        fleet::FleetConfig {
            endpoints: self.endpoints.clone(),
            prefix: self.prefix.clone(),
            ttl_s: self.ttl_s,
            connect_timeout_ms: self.connect_timeout_ms,
        }
    }
}

/// `[proc]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcConfig {
    /// Off: no Proc_Repair_Healer.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Policies, tried in order until one names a clear culprit.
    #[serde(default = "default_proc_policies")]
    pub policies: Vec<ProcPolicy>,
    /// Forks per second above which RATE_TOO_HIGH names a user (default: MAXPROC_RATE_PERUID's T).
    #[serde(default)]
    pub rate_threshold: Option<u64>,
    /// Most lock–diagnose–kill rounds per violation.
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
}

impl Default for ProcConfig {
    fn default() -> Self {
        ProcConfig {
            enabled: true,
            policies: default_proc_policies(),
            rate_threshold: None,
            max_rounds: default_rounds(),
        }
    }
}

/// Proc_Repair_Healer's policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
pub enum ProcPolicy {
    /// The user with the most processes.
    TOO_MANY_PROCS,
    /// The user forking fastest.
    RATE_TOO_HIGH,
    /// The user with the deepest process tree.
    TREE_TOO_DEEP,
}

/// `[mem]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemConfig {
    /// Off: no Mem_Reclaim_Healer.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The policy.
    #[serde(default = "default_mem_policy")]
    pub policy: MemPolicy,
    /// Users MAX_RSSUID_SAVEUID spares.
    #[serde(default)]
    pub save_users: Vec<u32>,
    /// Most rounds per violation.
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// The least resident memory (MiB) a user must hold to be named a memory culprit: below it,
    /// low free memory is not that user's doing (a guest whose RAM is page cache reports few free
    /// pages while its small services run normally).
    #[serde(default = "default_min_culprit_mb")]
    pub min_culprit_mb: u64,
}

fn default_min_culprit_mb() -> u64 {
    64
}

impl MemConfig {
    /// [`MemConfig::min_culprit_mb`] in 4 KiB pages.
    pub fn min_culprit_pages(&self) -> u64 {
        self.min_culprit_mb.saturating_mul(256)
    }
}

impl Default for MemConfig {
    fn default() -> Self {
        MemConfig {
            enabled: true,
            policy: default_mem_policy(),
            save_users: Vec::new(),
            max_rounds: default_rounds(),
            min_culprit_mb: default_min_culprit_mb(),
        }
    }
}

/// Mem_Reclaim_Healer's policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
pub enum MemPolicy {
    /// The largest process (and its same-user ancestors).
    MAX_RSS,
    /// Every process of the user holding the most memory.
    MAX_RSSUID,
    /// As MAX_RSSUID, sparing `save_users`.
    MAX_RSSUID_SAVEUID,
}

/// `[cpu]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    /// Off: no CPU_Share_Healer.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// What to do to the culprit user's processes.
    #[serde(default)]
    pub action: CpuAction,
    /// The share of all CPU time used over the window (0..1) above which the top user is the
    /// culprit.
    #[serde(default = "default_max_share")]
    pub max_share: f64,
    /// The window CPU time is measured over, in ms.
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
    /// The nice value for `action = "renice"` (0..=19).
    #[serde(default = "default_nice")]
    pub nice: i8,
    /// `action = "stop"`: the user's processes get SIGCONT after this many seconds (0: only
    /// `bdmon resume-user` resumes them).
    #[serde(default = "default_resume_after_s")]
    pub resume_after_s: u64,
    /// Most lock–diagnose–repair rounds per violation.
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
}

impl Default for CpuConfig {
    fn default() -> Self {
        CpuConfig {
            enabled: true,
            action: CpuAction::default(),
            max_share: default_max_share(),
            window_ms: default_window_ms(),
            nice: default_nice(),
            resume_after_s: default_resume_after_s(),
            max_rounds: default_rounds(),
        }
    }
}

fn default_max_share() -> f64 {
    0.75
}

fn default_window_ms() -> u64 {
    500
}

fn default_nice() -> i8 {
    19
}

fn default_resume_after_s() -> u64 {
    300
}

/// What CPU_Share_Healer does to the culprit user.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuAction {
    /// Lower the priority of every process of the user (`RENICE_UID`); nothing stops.
    #[default]
    Renice,
    /// SIGSTOP every process of the user (`STOP_UID`), SIGCONT after `resume_after_s` or on
    /// `bdmon resume-user`.
    Stop,
    /// SIGKILL every process of the user.
    Kill,
}

/// What the hang detector does to a task that holds a CPU while timer ticks advance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FreeCpu {
    /// SIGSTOP its process (`STOP_PID`; patched kernels).
    #[default]
    Stop,
    /// SIGKILL its process.
    Kill,
    /// Leave it; go straight to `action`.
    Off,
}

/// `[hang]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HangConfig {
    /// What to do.
    #[serde(default)]
    pub action: HangAction,
    /// The command for `action = "command"`; `{guest}` is replaced by the guest's name.
    #[serde(default)]
    pub command: Vec<String>,
    /// A progress sensor must also have stalled this long (ms) to count as a hang: a guest
    /// starved of host CPU, or a quiet one between two context switches, is not hung.
    #[serde(default = "default_min_stall_ms")]
    pub min_stall_ms: u64,
    /// A CPU held by one task while others wait and timer ticks advance: free it by stopping or
    /// killing that task's process before `action` is taken.
    #[serde(default)]
    pub free_cpu: FreeCpu,
    /// `free_cpu` may act on a root process (never on init or a kernel thread).
    #[serde(default)]
    pub free_root: bool,
    /// The task must have held its CPU at least this long (ms).
    #[serde(default = "default_min_hold_ms")]
    pub min_hold_ms: u64,
}

fn default_min_hold_ms() -> u64 {
    2000
}

impl Default for HangConfig {
    fn default() -> Self {
        HangConfig {
            action: HangAction::default(),
            command: Vec::new(),
            min_stall_ms: default_min_stall_ms(),
            free_cpu: FreeCpu::default(),
            free_root: false,
            min_hold_ms: default_min_hold_ms(),
        }
    }
}

fn default_min_stall_ms() -> u64 {
    3000
}

/// Hang action.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HangAction {
    /// Log it.
    #[default]
    Report,
    /// Log it and run `command` (e.g. a restart).
    Command,
    /// Log it and restart the guest through its bridge (bdvmm reboots it in place; the monitor
    /// needs `restart = true` in the bridge's config).
    Restart,
}

/// One guest.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// Its name in events and metrics.
    pub name: String,
    /// The bridge, HOST:PORT.
    pub bridge: String,
    /// Directory with ca.pem and the monitor's key and certificate.
    pub pki: PathBuf,
    /// This monitor's name (its certificate's).
    pub monitor: String,
    /// The name in the bridge's certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// Stock kernel: its System.map (with `vmlinux`).
    #[serde(default)]
    pub system_map: Option<PathBuf>,
    /// Stock kernel: its vmlinux (for BTF).
    #[serde(default)]
    pub vmlinux: Option<PathBuf>,
    /// Sampling period for this guest.
    #[serde(default)]
    pub sample_ms: Option<u64>,
    /// Pause lease while healing; kills are posted only while more than a quarter of it is left
    /// ([`crate::hm::LEASE_MARGIN`]).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Most task_structs one walk of this guest's task lists takes, processes and threads
    /// together (a hostile kernel cannot make bdmon walk more).
    #[serde(default = "default_walk_entries")]
    pub walk_entries: usize,
    /// Longest one walk may take, in ms (never longer than the lease allows a kill after it).
    #[serde(default = "default_walk_ms")]
    pub walk_ms: u64,
    /// This guest's pause budget, in percent (default: the top-level `pause_budget_percent`,
    /// filled in when the config is read).
    #[serde(default)]
    pub pause_budget_percent: Option<f64>,
    /// The budget's window in seconds (the top-level `pause_budget_window_s`, filled in).
    #[serde(skip)]
    pub pause_budget_window_s: Option<u64>,
    /// Backoff of failing steps, (first, longest) delay in ms (the top level's, filled in).
    #[serde(skip)]
    pub retry_ms: Option<(u64, u64)>,
    /// Threshold overrides, by sensor name.
    #[serde(default)]
    pub thresholds: BTreeMap<String, u64>,
    /// Session recovery: when this guest hangs, move its services' sessions (State Boxes) to a
    /// standby front end instead of the `[hang]` action.
    #[serde(default)]
    pub failover: Option<FailoverConfig>,
    /// Set for a guest the fleet assigned: bdmon takes no lock on it while this says it cannot
    /// prove it still owns the guest.
    #[serde(skip)]
    pub fence: Option<Ownership>,
}

/// Whether this monitor may act on a fleet guest now: its etcd membership is confirmed.
#[derive(Clone)]
pub struct Ownership(pub std::sync::Arc<dyn Fn() -> bool + Send + Sync>);

impl Ownership {
    /// True while the monitor may not act.
    pub fn fenced(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ownership(fenced: {})", self.fenced())
    }
}

/// `[guest.failover]`: where a failed guest's sessions go.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverConfig {
    /// The standby front end's admin address, HOST:PORT (its `IMPORT` and `TAKEOVER`).
    pub backup: String,
    /// Only the State Boxes of processes with this command name (`comm`, ≤ 15 bytes).
    #[serde(default)]
    pub comm: Option<String>,
    /// Only the State Boxes of processes of this uid (the kernel's, not the box's claim).
    #[serde(default)]
    pub uid: Option<u32>,
    /// After the standby serves: `"restart"` the failed guest through its bridge (the monitor
    /// needs `restart = true`), or `"none"`.
    #[serde(default)]
    pub fence: Fence,
    /// Longest one exchange with the standby may take, ms.
    #[serde(default = "default_failover_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_failover_timeout_ms() -> u64 {
    10_000
}

/// What is done to a failed guest once its sessions moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fence {
    /// Nothing (its service must already be cut off: dead, frozen or off the network).
    #[default]
    None,
    /// Restart it in place (its memory, so its stale sessions, are gone).
    Restart,
}

impl GuestConfig {
    /// `[guest.thresholds]` by sensor id.
    pub fn threshold_overrides(&self) -> std::collections::HashMap<u32, u64> {
        self.thresholds
            .iter()
            .filter_map(|(n, t)| {
                SENSOR_NAMES
                    .iter()
                    .find(|(s, _)| s == n)
                    .map(|(_, id)| (*id, *t))
            })
            .collect()
    }

    /// `[guest.thresholds]` of sensors known by name only (per device: `NET_RX:eth0`).
    pub fn threshold_names(&self) -> std::collections::HashMap<String, u64> {
        self.thresholds
            .iter()
            .filter(|(n, _)| is_device_sensor(n))
            .map(|(n, t)| (n.clone(), *t))
            .collect()
    }

    /// The budget of one walk of this guest's task lists.
    pub fn walk_limits(&self) -> introspect::tasks::Limits {
        introspect::tasks::Limits {
            max_entries: self.walk_entries,
            max_time: std::time::Duration::from_millis(self.walk_ms),
        }
    }

    /// This guest's pause budget.
    pub fn pause_budget(&self) -> crate::budget::PauseBudget {
        crate::budget::PauseBudget::new(
            self.pause_budget_percent
                .unwrap_or_else(default_budget_percent),
            std::time::Duration::from_secs(
                self.pause_budget_window_s
                    .unwrap_or_else(default_budget_window_s),
            ),
        )
    }

    /// Backoff for this guest's failing steps.
    pub fn backoff(&self) -> crate::budget::Backoff {
        let (min, max) = self
            .retry_ms
            .unwrap_or((default_retry_min_ms(), default_retry_max_ms()));
        crate::budget::Backoff::new(
            std::time::Duration::from_millis(min),
            std::time::Duration::from_millis(max),
        )
    }

    /// The bridge identity.
    pub fn identity(&self) -> bridge_client::tls::Identity {
        let mut id = bridge_client::tls::Identity::from_pki_dir(&self.pki, &self.monitor);
        id.server_name = self.server_name.clone();
        id
    }
}

fn yes() -> bool {
    true
}
fn default_sample_ms() -> u64 {
    10
}
fn default_events() -> String {
    "-".into()
}
fn default_rounds() -> u32 {
    20
}
fn default_lease_ms() -> u64 {
    2000
}
fn default_walk_entries() -> usize {
    introspect::tasks::DEFAULT_MAX_ENTRIES
}
fn default_walk_ms() -> u64 {
    crate::events::millis(introspect::tasks::DEFAULT_MAX_TIME)
}
fn default_budget_percent() -> f64 {
    1.0
}
fn default_budget_window_s() -> u64 {
    60
}
fn default_retry_min_ms() -> u64 {
    1000
}
fn default_retry_max_ms() -> u64 {
    60_000
}
fn default_server_name() -> String {
    bridge_client::tls::DEFAULT_SERVER_NAME.into()
}
fn default_proc_policies() -> Vec<ProcPolicy> {
    vec![
        ProcPolicy::RATE_TOO_HIGH,
        ProcPolicy::TOO_MANY_PROCS,
        ProcPolicy::TREE_TOO_DEEP,
    ]
}
fn default_mem_policy() -> MemPolicy {
    MemPolicy::MAX_RSSUID_SAVEUID
}

/// A per-device Progress Box sensor's name: `NET_RX:<dev>` or `NET_IRQS:<dev>` (patched
/// kernels create them as the devices register; guest-kernel-patches/0008).
pub fn is_device_sensor(name: &str) -> bool {
    let dev = name
        .strip_prefix("NET_RX:")
        .or_else(|| name.strip_prefix("NET_IRQS:"));
    dev.is_some_and(|d| {
        (1..=15).contains(&d.len())
            && d.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    })
}

/// Sensor names a threshold override may use.
pub const SENSOR_NAMES: &[(&str, u32)] = &[
    ("TIMER_TICKS", 1),
    ("CONTEXT_SWITCHES", 2),
    ("NPROCS", 3),
    ("MAXPROC_RATE_PERUID", 4),
    ("FREE_PAGES", 5),
    ("OOM_KILLER_RUNNING", 6),
    ("FORK_FAILED", 7),
    ("FILE_TABLE_FULL", 8),
    ("OOM_KILLS", 9),
    ("REPAIRS_APPLIED", 10),
    ("REPAIRS_REJECTED", 11),
    ("NR_RUNNING", 12),
    ("CPU_PROGRESS", 13),
    ("IRQS", 14),
    ("NET_RX_PACKETS", 15),
    ("TCP_ACCEPTS", 16),
];

impl Config {
    /// Reads and checks a file; relative paths are taken relative to it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text` as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut c: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(f) = &mut c.fleet {
            fix(&mut f.pki);
        }
        for g in &mut c.guests {
            g.pause_budget_percent.get_or_insert(c.pause_budget_percent);
            g.pause_budget_window_s = Some(c.pause_budget_window_s);
            g.retry_ms = Some((c.retry_min_ms, c.retry_max_ms));
            fix(&mut g.pki);
            if let Some(p) = &mut g.system_map {
                fix(p);
            }
            if let Some(p) = &mut g.vmlinux {
                fix(p);
            }
        }
        if c.events != "-" && Path::new(&c.events).is_relative() {
            c.events = base.join(&c.events).to_string_lossy().into_owned();
        }
        c.check()?;
        Ok(c)
    }

    /// The `[[guest]]` bdmon watches for fleet guest `name`, whose bridge is at `bridge`: this
    /// monitor's identity and every default of the file. None without `[fleet]`.
    pub fn fleet_guest(&self, name: &str, bridge: &str) -> Option<GuestConfig> {
        let f = self.fleet.as_ref()?;
        let mut g: GuestConfig = serde_json::from_value(serde_json::json!({
            "name": name, "bridge": bridge, "pki": f.pki, "monitor": f.monitor,
            "server_name": f.server_name,
        }))
        .ok()?;
        g.pause_budget_percent = Some(self.pause_budget_percent);
        g.pause_budget_window_s = Some(self.pause_budget_window_s);
        g.retry_ms = Some((self.retry_min_ms, self.retry_max_ms));
        g.sample_ms = f.sample_ms;
        g.thresholds = f.thresholds.clone();
        g.lease_ms = f.lease_ms;
        g.walk_entries = f.walk_entries;
        g.walk_ms = f.walk_ms;
        Some(g)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.guests.is_empty() && self.fleet.is_none() {
            return bad("no [[guest]] and no [fleet]: nothing to watch".into());
        }
        if let Some(f) = &self.fleet {
            f.fleet_config()
                .validate()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            fleet::check_name(&f.monitor)
                .map_err(|e| ConfigError::Invalid(format!("[fleet] monitor: {e}")))?;
            if f.monitors_per_guest == 0 || f.monitors_per_guest > 16 {
                return bad("[fleet] monitors_per_guest must be 1..=16".into());
            }
        }
        if self.sample_ms == 0 || self.sample_ms > 3_600_000 {
            return bad("sample_ms must be 1..=3600000".into());
        }
        if self.spare_users.contains(&u32::MAX) {
            return bad("spare_users: 4294967295 is not a user".into());
        }
        let percent_ok = |p: f64| p > 0.0 && p <= 100.0;
        if !percent_ok(self.pause_budget_percent) {
            return bad("pause_budget_percent must be more than 0 and at most 100".into());
        }
        if !(1..=86_400).contains(&self.pause_budget_window_s) {
            return bad("pause_budget_window_s must be 1..=86400".into());
        }
        if self.retry_min_ms == 0 || self.retry_max_ms < self.retry_min_ms {
            return bad(
                "retry_min_ms must be at least 1 and retry_max_ms at least retry_min_ms".into(),
            );
        }
        if self.proc.policies.is_empty() {
            return bad("[proc] policies is empty; set enabled = false instead".into());
        }
        if !(self.cpu.max_share > 0.0 && self.cpu.max_share <= 1.0) {
            return bad("[cpu] max_share must be more than 0 and at most 1".into());
        }
        if !(10..=60_000).contains(&self.cpu.window_ms) {
            return bad("[cpu] window_ms must be 10..=60000".into());
        }
        if !(0..=19).contains(&self.cpu.nice) {
            return bad("[cpu] nice must be 0..=19 (a monitor only lowers priority)".into());
        }
        if self.hang.action == HangAction::Command && self.hang.command.is_empty() {
            return bad("[hang] action = \"command\" needs command = [...]".into());
        }
        for (i, g) in self.guests.iter().enumerate() {
            if g.name.is_empty() || self.guests[..i].iter().any(|o| o.name == g.name) {
                return bad(format!("guest #{i}: empty or duplicate name {:?}", g.name));
            }
            check_guest(g)?;
        }
        if let Some(g) = self.fleet_guest("[fleet]", "-") {
            check_guest(&g)?;
        }
        Ok(())
    }
}

/// What every guest, static or from the fleet, must hold to.
fn check_guest(g: &GuestConfig) -> Result<(), ConfigError> {
    let bad = |m: String| Err(ConfigError::Invalid(m));
    if g.system_map.is_some() != g.vmlinux.is_some() {
        return bad(format!(
            "guest {}: give both system_map and vmlinux (stock kernel) or neither",
            g.name
        ));
    }
    if g.sample_ms == Some(0) {
        return bad(format!("guest {}: sample_ms must be at least 1", g.name));
    }
    if g.pause_budget_percent
        .is_some_and(|p| !(p > 0.0 && p <= 100.0))
    {
        return bad(format!(
            "guest {}: pause_budget_percent must be more than 0 and at most 100",
            g.name
        ));
    }
    if !(10..=600_000).contains(&g.lease_ms) {
        return bad(format!("guest {}: lease_ms must be 10..=600000", g.name));
    }
    if !(1..=1 << 22).contains(&g.walk_entries) || !(1..=600_000).contains(&g.walk_ms) {
        return bad(format!(
            "guest {}: walk_entries must be 1..=4194304 and walk_ms 1..=600000",
            g.name
        ));
    }
    for name in g.thresholds.keys() {
        if !SENSOR_NAMES.iter().any(|(n, _)| n == name) && !is_device_sensor(name) {
            return bad(format!(
                "guest {}: unknown sensor {name:?} in thresholds",
                g.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: &str =
        "[[guest]]\nname = \"vm\"\nbridge = \"127.0.0.1:1\"\npki = \"p\"\nmonitor = \"m\"\n";

    #[test]
    fn defaults_and_relative_paths() {
        let c = Config::parse(GUEST, Path::new("/etc/bdmon/bdmon.toml")).unwrap();
        assert_eq!(c.sample_ms, 10);
        assert_eq!(c.guests[0].pki, Path::new("/etc/bdmon/p"));
        assert_eq!(c.mem.policy, MemPolicy::MAX_RSSUID_SAVEUID);
        assert_eq!(c.proc.policies[0], ProcPolicy::RATE_TOO_HIGH);
        assert!(!c.dry_run);
        assert_eq!(
            c.guests[0].walk_limits(),
            introspect::tasks::Limits::default()
        );
        // First, do no harm: 1 % of any minute, retries from 1 s to 60 s.
        let b = c.guests[0].pause_budget();
        assert_eq!(b.allowed(), std::time::Duration::from_millis(600));
        assert_eq!(b.window(), std::time::Duration::from_secs(60));
        assert_eq!(
            c.guests[0].backoff().fail(),
            std::time::Duration::from_secs(1)
        );
        let c = Config::parse(
            &format!("pause_budget_percent = 2.5\n{GUEST}pause_budget_percent = 0.5\n"),
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(
            c.guests[0].pause_budget().allowed(),
            std::time::Duration::from_millis(300)
        );
    }

    #[test]
    fn per_device_thresholds_go_by_name() {
        let c = Config::parse(
            &format!(
                "{GUEST}[guest.thresholds]\nNET_RX_PACKETS = 1500\n\"NET_RX:eth0\" = 2000\n\
                 \"NET_IRQS:eth0\" = 3000\n"
            ),
            Path::new("x.toml"),
        )
        .unwrap();
        let g = &c.guests[0];
        assert_eq!(g.threshold_overrides().get(&15), Some(&1500));
        assert_eq!(g.threshold_names().len(), 2);
        assert_eq!(g.threshold_names().get("NET_RX:eth0"), Some(&2000));
        for bad in [
            "NET_RX:",
            "NET_RX:a b",
            "NET_RX:0123456789abcdefX",
            "NET_TX:eth0",
        ] {
            assert!(!is_device_sensor(bad), "{bad}");
        }
    }

    const FLEET: &str = "[fleet]\nmonitor = \"m\"\npki = \"p\"\n";

    /// A fleet guest gets the [fleet] section's settings, or a [[guest]]'s defaults.
    #[test]
    fn fleet_guests_take_the_sections_settings() {
        let c = Config::parse(FLEET, Path::new("/etc/bdmon/bdmon.toml")).unwrap();
        let g = c.fleet_guest("vm1", "10.0.0.1:7070").unwrap();
        assert_eq!(g.pki, Path::new("/etc/bdmon/p"));
        assert_eq!(g.walk_limits(), introspect::tasks::Limits::default());
        assert_eq!(g.lease_ms, default_lease_ms());
        let c = Config::parse(
            &format!(
                "{FLEET}sample_ms = 20\nlease_ms = 10000\nwalk_ms = 8000\nwalk_entries = 5000\n"
            ),
            Path::new("x.toml"),
        )
        .unwrap();
        let g = c.fleet_guest("vm1", "10.0.0.1:7070").unwrap();
        assert_eq!(
            (g.sample_ms, g.lease_ms, g.walk_ms, g.walk_entries),
            (Some(20), 10_000, 8_000, 5_000)
        );
    }

    #[test]
    fn nonsense_is_refused_with_a_reason() {
        for (text, want) in [
            ("", "no [[guest]]"),
            (&format!("sample_ms = 0\n{GUEST}") as &str, "sample_ms"),
            (
                &format!("{GUEST}[guest.thresholds]\nNPROC = 3\n"),
                "unknown sensor",
            ),
            (&format!("{GUEST}system_map = \"x\"\n"), "both"),
            (
                &format!("[proc]\npolicies = [\"FASTEST\"]\n{GUEST}"),
                "unknown variant",
            ),
            (
                &format!("[hang]\naction = \"command\"\n{GUEST}"),
                "needs command",
            ),
            (&format!("{GUEST}{GUEST}"), "duplicate"),
            (&format!("{GUEST}walk_entries = 0\n"), "walk_entries"),
            (
                &format!("pause_budget_percent = 0.0\n{GUEST}"),
                "pause_budget_percent",
            ),
            (
                &format!("{GUEST}pause_budget_percent = 150.0\n"),
                "pause_budget_percent",
            ),
            (&format!("retry_max_ms = 10\n{GUEST}"), "retry_max_ms"),
            // The fleet's guests are held to what a [[guest]] is.
            (
                &format!("{FLEET}sample_ms = 0\n"),
                "guest [fleet]: sample_ms",
            ),
            (&format!("{FLEET}lease_ms = 5\n"), "guest [fleet]: lease_ms"),
            (
                &format!("{FLEET}walk_ms = 0\n"),
                "guest [fleet]: walk_entries",
            ),
            (
                &format!("{FLEET}[fleet.thresholds]\nNPROC = 3\n"),
                "guest [fleet]: unknown sensor",
            ),
        ] {
            let e = Config::parse(text, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
