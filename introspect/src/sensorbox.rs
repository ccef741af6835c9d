//! The Sensor Box, layout version 1 (see `guest-kernel-patches/README.md`), read from guest
//! memory with plain reads and no help from the guest.
//!
//! The bytes come from an untrusted guest: every offset, count and size is checked against the
//! region before use, names are cut at their field, and no reader here can panic or allocate
//! more than the region's size.

use crate::le;
use crate::mem::{MemError, PhysMem};

/// `"BKDRSBOX"`.
pub const MAGIC: &[u8; 8] = b"BKDRSBOX";
/// The layout version this code reads.
pub const VERSION: u32 = 1;
/// Size of the header.
pub const HEADER_SIZE: usize = 256;
/// Size of one sensor record.
pub const SENSOR_SIZE: usize = 64;
/// Most sensors we accept in a table.
pub const MAX_SENSORS: u32 = 4096;
/// Largest region we read.
pub const MAX_REGION: u64 = 16 << 20;
/// Size of the externalized-state descriptor of patch 0003 (up to `total_forks`).
pub const STATE_SIZE_BASE: usize = 0x90;
/// Size of the descriptor with the per-user fork table (patch 0005); a shorter one has none.
pub const STATE_SIZE_FORK_USERS: usize = 0xa0;
/// Size of the descriptor that names the per-CPU runqueues (patch 0007).
pub const STATE_SIZE_RUNQUEUES: usize = 0xa8;
/// Size of one entry of the per-user fork table (`struct bd_fork_user`).
pub const FORK_USER_SIZE: u32 = 24;
/// Most entries we accept in the per-user fork table.
pub const MAX_FORK_USERS: u32 = 4096;

/// Built-in sensor numbers.
pub mod ids {
    /// Timer ticks (progress).
    pub const TIMER_TICKS: u32 = 1;
    /// Context switches (progress).
    pub const CONTEXT_SWITCHES: u32 = 2;
    /// Number of tasks (level).
    pub const NPROCS: u32 = 3;
    /// Highest per-user fork rate (level).
    pub const MAXPROC_RATE_PERUID: u32 = 4;
    /// Free pages (level, lower bound).
    pub const FREE_PAGES: u32 = 5;
    /// Entries to the OOM handler (pressure).
    pub const OOM_KILLER_RUNNING: u32 = 6;
    /// Forks refused for lack of resources (pressure).
    pub const FORK_FAILED: u32 = 7;
    /// file-max reached (pressure).
    pub const FILE_TABLE_FULL: u32 = 8;
    /// Tasks killed by the OOM killer (pressure).
    pub const OOM_KILLS: u32 = 9;
    /// Repair requests carried out.
    pub const REPAIRS_APPLIED: u32 = 10;
    /// Repair requests rejected.
    pub const REPAIRS_REJECTED: u32 = 11;
    /// Runnable tasks summed over CPUs, the kernel's `nr_running()` (level).
    pub const NR_RUNNING: u32 = 12;
    /// The oldest moment at which every CPU last made progress: it was idle, ran its task alone
    /// or switched tasks (progress; a CPU held by one task while others wait freezes it).
    pub const CPU_PROGRESS: u32 = 13;
    /// Interrupts handled by every CPU (progress; the Progress Box, no contract by default).
    pub const IRQS: u32 = 14;
    /// Packets received on any network device but loopback (progress; the Progress Box).
    pub const NET_RX_PACKETS: u32 = 15;
    /// TCP connections accepted (progress; the Progress Box).
    pub const TCP_ACCEPTS: u32 = 16;
    /// The first per-device Progress Box sensor: device slot `k` (ifindex − 1, loopback never)
    /// has `NET_RX:<dev>` at `NET_DEV + 2k` and `NET_IRQS:<dev>` at `NET_DEV + 2k + 1`
    /// (patched kernels, created as devices register).
    pub const NET_DEV: u32 = 32;
    /// Device slots with per-device sensors.
    pub const NET_DEVS: u32 = 8;
}

/// Why a Sensor Box could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SbError {
    /// Memory could not be read.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// No Sensor Box there (yet).
    #[error("no Sensor Box at this address (magic {0:02x?}); is the guest kernel patched and booted with backdoor.sb=?")]
    BadMagic([u8; 8]),
    /// A layout we do not know.
    #[error(
        "Sensor Box layout version {0} is not supported (this monitor reads version {VERSION})"
    )]
    Version(u32),
    /// A field that breaks the layout's rules.
    #[error("malformed Sensor Box: {0}")]
    Malformed(String),
    /// Every copy was torn by concurrent updates.
    #[error("Sensor Box kept changing during {0} read attempts; pause the guest to read it")]
    Torn(u32),
    /// The layout the header declares spans this many bytes, more than the caller may read.
    #[error("the Sensor Box spans {0:#x} bytes, more than may be read")]
    NotAllowed(u64),
}

/// The three sensor classes of the Backdoors papers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SensorClass {
    /// A counter that must advance within T ms.
    Progress,
    /// A value that must stay ≤ T (≥ T with the lower-bound flag).
    Level,
    /// A count of bad events that must stay ≤ T.
    Pressure,
    /// A class this monitor does not know (ignored by checks).
    Unknown(u16),
}

impl SensorClass {
    fn from_raw(c: u16) -> Self {
        match c {
            1 => Self::Progress,
            2 => Self::Level,
            3 => Self::Pressure,
            other => Self::Unknown(other),
        }
    }
}

/// Sensor flag: the record is in use.
pub const FLAG_VALID: u16 = 1;
/// Sensor flag: a level sensor whose value must stay at or above its threshold.
pub const FLAG_LOWER_BOUND: u16 = 2;

/// One sensor ⟨ID, class, threshold, value⟩.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Sensor {
    /// Global sensor number.
    pub id: u32,
    /// Its class.
    pub class: SensorClass,
    /// Flags (`FLAG_*`).
    pub flags: u16,
    /// T.
    pub threshold: u64,
    /// V.
    pub value: u64,
    /// Guest jiffies when V last changed.
    pub updated: u64,
    /// Name, e.g. `NPROCS`.
    pub name: String,
}

impl Sensor {
    /// For a progress sensor of a guest's own Sensor Box (`hz` > 0): how long, in ms of guest
    /// time, V has not advanced as of the box's `jiffies` (`updated` is the jiffy of its last
    /// advance). `None` for other classes and virtual views, which one sample cannot judge.
    pub fn stalled_ms(&self, jiffies: u64, hz: u32) -> Option<u64> {
        (self.class == SensorClass::Progress && hz > 0)
            .then(|| jiffies.saturating_sub(self.updated).saturating_mul(1000) / u64::from(hz))
    }

    /// Whether a level or pressure sensor's value breaks its threshold now. Progress sensors are
    /// judged by the monitor over two samples (or, on one box, by [`Sensor::stalled_ms`]).
    pub fn level_violated(&self) -> bool {
        match self.class {
            SensorClass::Level if self.flags & FLAG_LOWER_BOUND != 0 => self.value < self.threshold,
            SensorClass::Level | SensorClass::Pressure => self.value > self.threshold,
            _ => false,
        }
    }
}

/// The header fields a monitor uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Header {
    /// Layout version.
    pub version: u32,
    /// Size of the region the kernel was given.
    pub region_size: u32,
    /// HZ of the guest.
    pub hz: u32,
    /// Random per boot.
    pub boot_id: u64,
    /// Sequence counter (even when stable).
    pub seq: u64,
    /// Guest monotonic clock at the last publish.
    pub clock_ns: u64,
    /// Guest jiffies at the last publish.
    pub jiffies: u64,
    /// Number of publishes.
    pub publishes: u64,
    /// Offset and size of the externalized-state descriptor.
    pub state: (u32, u32),
    /// Offset and size of the repair-hook mailbox.
    pub hooks: (u32, u32),
}

/// A consistent copy of a Sensor Box.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SensorBox {
    /// Guest-physical address it was read from.
    pub gpa: u64,
    /// Header.
    pub header: Header,
    /// The sensors in use.
    pub sensors: Vec<Sensor>,
    /// The externalized-state descriptor, if the kernel provides one.
    pub state: Option<ExternalState>,
}

impl SensorBox {
    /// The sensor with `id`.
    pub fn sensor(&self, id: u32) -> Option<&Sensor> {
        self.sensors.iter().find(|s| s.id == id)
    }

    /// The value of sensor `id`.
    pub fn value(&self, id: u32) -> Option<u64> {
        self.sensor(id).map(|s| s.value)
    }

    /// Guest-physical address of the repair-hook mailbox, if any.
    pub fn hooks_gpa(&self) -> Option<u64> {
        let (off, size) = self.header.hooks;
        (off != 0 && size != 0).then(|| self.gpa + u64::from(off))
    }
}

/// Where the guest kernel's own structures are (kernel virtual addresses unless named `_phys`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExternalState {
    /// `kaslr_offset()`.
    pub kaslr_offset: u64,
    /// `phys_base`.
    pub phys_base: u64,
    /// Direct-map base.
    pub page_offset_base: u64,
    /// `vmemmap_base`.
    pub vmemmap_base: u64,
    /// `_text`.
    pub text_virt: u64,
    /// Physical address of `_text`.
    pub text_phys: u64,
    /// `&init_task`.
    pub init_task: u64,
    /// `&tasklist_lock`.
    pub tasklist_lock: u64,
    /// `__start_BTF`.
    pub btf_start: u64,
    /// Size of the BTF blob.
    pub btf_size: u64,
    /// Physical address of the kernel page-table root.
    pub init_top_pgt_phys: u64,
    /// `&jiffies_64`.
    pub jiffies_64: u64,
    /// `&nr_threads`.
    pub nr_threads: u64,
    /// `linux_banner`.
    pub linux_banner: u64,
    /// 4 or 5.
    pub pgtable_levels: u32,
    /// `nr_cpu_ids`.
    pub nr_cpu_ids: u32,
    /// `__per_cpu_offset`.
    pub per_cpu_offset: u64,
    /// `&total_forks`.
    pub total_forks: u64,
    /// The per-user fork table behind `MAXPROC_RATE_PERUID`: its address (`bd_fork_users`), its
    /// number of entries and the size of one entry. `None` when the descriptor is shorter than
    /// [`STATE_SIZE_FORK_USERS`] (a kernel without patch 0005). Read it with
    /// [`crate::forkrate::per_user_fork_rates`].
    pub fork_users: Option<(u64, u32, u32)>,
    /// `&runqueues`, the per-CPU scheduler runqueue (a per-CPU address: add
    /// `__per_cpu_offset[cpu]`). `None` when the descriptor is shorter than
    /// [`STATE_SIZE_RUNQUEUES`] (a kernel without patch 0007) or it is 0. Read it with
    /// [`crate::cpus`].
    pub runqueues: Option<u64>,
}

// Fields of a copy whose length the parser checked first (`within`); a read past its end (a bug,
// never the guest's doing) gives 0 rather than a panic.

fn u16_at(b: &[u8], off: usize) -> u16 {
    le::u16_at(b, off).unwrap_or(0)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    le::u32_at(b, off).unwrap_or(0)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    le::u64_at(b, off).unwrap_or(0)
}

/// Checks that `off..off+len` lies inside a region of `region` bytes.
fn within(what: &str, off: u64, len: u64, region: u64) -> Result<(), SbError> {
    match off.checked_add(len) {
        Some(end) if end <= region => Ok(()),
        _ => Err(SbError::Malformed(format!(
            "{what} ({off:#x}+{len:#x}) runs past the {region:#x}-byte region"
        ))),
    }
}

/// The part of the region that must be copied to parse it: from 0 to the end of the furthest
/// table the header names. Validates the header on the way.
pub fn extent(header: &[u8], region: u64) -> Result<u64, SbError> {
    if header.len() < HEADER_SIZE {
        return Err(SbError::Malformed("short header".into()));
    }
    let magic: [u8; 8] = header[0..8].try_into().unwrap_or([0; 8]);
    if &magic != MAGIC {
        return Err(SbError::BadMagic(magic));
    }
    let version = u32_at(header, 0x08);
    if version != VERSION {
        return Err(SbError::Version(version));
    }
    if u32_at(header, 0x0c) as usize != HEADER_SIZE {
        return Err(SbError::Malformed(format!(
            "header_size {}",
            u32_at(header, 0x0c)
        )));
    }
    let region_size = u64::from(u32_at(header, 0x10));
    if region_size < HEADER_SIZE as u64 || region_size > region {
        return Err(SbError::Malformed(format!(
            "region_size {region_size:#x} (the range is {region:#x})"
        )));
    }
    if u32_at(header, 0x14) as usize != SENSOR_SIZE {
        return Err(SbError::Malformed(format!(
            "sensor_size {}",
            u32_at(header, 0x14)
        )));
    }
    let sensor_off = u64::from(u32_at(header, 0x18));
    let capacity = u32_at(header, 0x1c);
    let count = u32_at(header, 0x20);
    if capacity > MAX_SENSORS || count > capacity {
        return Err(SbError::Malformed(format!(
            "sensor_count {count} / capacity {capacity}"
        )));
    }
    let table_len = u64::from(capacity) * SENSOR_SIZE as u64;
    within("sensor table", sensor_off, table_len, region_size)?;
    let (state_off, state_size) = (
        u64::from(u32_at(header, 0x48)),
        u64::from(u32_at(header, 0x4c)),
    );
    let (hooks_off, hooks_size) = (
        u64::from(u32_at(header, 0x50)),
        u64::from(u32_at(header, 0x54)),
    );
    within("state descriptor", state_off, state_size, region_size)?;
    within("hook mailbox", hooks_off, hooks_size, region_size)?;
    Ok([
        HEADER_SIZE as u64,
        sensor_off + table_len,
        state_off + state_size,
        hooks_off + hooks_size,
    ]
    .into_iter()
    .max()
    .unwrap_or(HEADER_SIZE as u64))
}

/// Lays out a Sensor Box image (ABI v1) holding `sensors`, as a guest kernel would: the header,
/// the sensor table at 0x100 (capacity = the number of sensors, at least 64), an empty mailbox on
/// the next page boundary after the table (at least 0x2000) and no externalized-state descriptor.
/// `seq` must be even for a reader to accept the copy. For tests and benchmarks of readers; the
/// region is the smallest multiple of 16 KiB that holds it all.
///
/// # Panics
///
/// If the image would not fit the layout's 32-bit size fields (more than about 67 million
/// sensors; a reader accepts at most [`MAX_SENSORS`]).
pub fn encode(sensors: &[Sensor], hz: u32, seq: u64) -> Vec<u8> {
    let capacity = sensors.len().max(64);
    let table_end = 0x100 + capacity * SENSOR_SIZE;
    let hooks = table_end.next_multiple_of(0x1000).max(0x2000);
    let hooks_size = 64 + 64 * 32;
    let region = (hooks + hooks_size).next_multiple_of(16 << 10);
    let mut b = vec![0u8; region];
    let put32 = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |b: &mut [u8], o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_le_bytes());
    let field = |v: usize| u32::try_from(v).expect("a Sensor Box image fits in 4 GiB");
    b[0..8].copy_from_slice(MAGIC);
    put32(&mut b, 0x08, VERSION);
    put32(&mut b, 0x0c, field(HEADER_SIZE));
    put32(&mut b, 0x10, field(region));
    put32(&mut b, 0x14, field(SENSOR_SIZE));
    put32(&mut b, 0x18, 0x100);
    put32(&mut b, 0x1c, field(capacity));
    put32(&mut b, 0x20, field(sensors.len()));
    put32(&mut b, 0x24, hz);
    put64(&mut b, 0x30, seq);
    put64(&mut b, 0x58, 1); // published once
    put32(&mut b, 0x50, field(hooks));
    put32(&mut b, 0x54, field(hooks_size));
    put32(&mut b, hooks, 64);
    put32(&mut b, hooks + 4, 32);
    for (i, s) in sensors.iter().enumerate() {
        let o = 0x100 + i * SENSOR_SIZE;
        let class: u16 = match s.class {
            SensorClass::Progress => 1,
            SensorClass::Level => 2,
            SensorClass::Pressure => 3,
            SensorClass::Unknown(c) => c,
        };
        put32(&mut b, o, s.id);
        b[o + 4..o + 6].copy_from_slice(&class.to_le_bytes());
        b[o + 6..o + 8].copy_from_slice(&(s.flags | FLAG_VALID).to_le_bytes());
        put64(&mut b, o + 8, s.threshold);
        put64(&mut b, o + 16, s.value);
        put64(&mut b, o + 24, s.updated);
        let name = s.name.as_bytes();
        let n = name.len().min(31);
        b[o + 32..o + 32 + n].copy_from_slice(&name[..n]);
    }
    b
}

/// Parses a copy of the region (at least `extent` bytes long), read from `gpa`.
pub fn parse(bytes: &[u8], gpa: u64) -> Result<SensorBox, SbError> {
    let mut sensors = Vec::new();
    let (header, state) = parse_parts(bytes, &mut sensors)?;
    Ok(SensorBox {
        gpa,
        header,
        sensors,
        state,
    })
}

/// [`parse`] into `out`, reusing its sensors' memory: a monitor sampling the same box again and
/// again allocates nothing once the names fit. On error `out` is unspecified (parse again).
pub fn parse_into(bytes: &[u8], gpa: u64, out: &mut SensorBox) -> Result<(), SbError> {
    let (header, state) = parse_parts(bytes, &mut out.sensors)?;
    out.gpa = gpa;
    out.header = header;
    out.state = state;
    Ok(())
}

fn parse_parts(
    bytes: &[u8],
    sensors: &mut Vec<Sensor>,
) -> Result<(Header, Option<ExternalState>), SbError> {
    let ext = extent(bytes, MAX_REGION)?;
    if (bytes.len() as u64) < ext {
        return Err(SbError::Malformed("copy shorter than the layout".into()));
    }
    let header = Header {
        version: u32_at(bytes, 0x08),
        region_size: u32_at(bytes, 0x10),
        hz: u32_at(bytes, 0x24),
        boot_id: u64_at(bytes, 0x28),
        seq: u64_at(bytes, 0x30),
        clock_ns: u64_at(bytes, 0x38),
        jiffies: u64_at(bytes, 0x40),
        publishes: u64_at(bytes, 0x58),
        state: (u32_at(bytes, 0x48), u32_at(bytes, 0x4c)),
        hooks: (u32_at(bytes, 0x50), u32_at(bytes, 0x54)),
    };
    let sensor_off = u32_at(bytes, 0x18) as usize;
    let count = u32_at(bytes, 0x20) as usize;
    let mut used = 0;
    for i in 0..count {
        let s = &bytes[sensor_off + i * SENSOR_SIZE..sensor_off + (i + 1) * SENSOR_SIZE];
        let flags = u16_at(s, 0x06);
        if flags & FLAG_VALID == 0 {
            continue;
        }
        let name_field = &s[0x20..0x40];
        let name_len = name_field
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(name_field.len());
        let raw = &name_field[..name_len];
        let sensor = Sensor {
            id: u32_at(s, 0x00),
            class: SensorClass::from_raw(u16_at(s, 0x04)),
            flags,
            threshold: u64_at(s, 0x08),
            value: u64_at(s, 0x10),
            updated: u64_at(s, 0x18),
            name: String::new(),
        };
        let slot = match sensors.get_mut(used) {
            Some(slot) => {
                let name = std::mem::take(&mut slot.name);
                *slot = Sensor { name, ..sensor };
                slot
            }
            None => {
                sensors.push(sensor);
                &mut sensors[used]
            }
        };
        used += 1;
        if slot.name.as_bytes() != raw {
            slot.name.clear();
            slot.name.extend(
                raw.iter()
                    .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' }),
            );
        }
    }
    sensors.truncate(used);
    let (state_off, state_size) = (header.state.0 as usize, header.state.1 as usize);
    let state = if state_size >= STATE_SIZE_BASE {
        // `extent` checked that the descriptor lies within the copy.
        let d = &bytes[state_off..state_off + state_size];
        Some(ExternalState {
            kaslr_offset: u64_at(d, 0x08),
            phys_base: u64_at(d, 0x10),
            page_offset_base: u64_at(d, 0x18),
            vmemmap_base: u64_at(d, 0x20),
            text_virt: u64_at(d, 0x28),
            text_phys: u64_at(d, 0x30),
            init_task: u64_at(d, 0x38),
            tasklist_lock: u64_at(d, 0x40),
            btf_start: u64_at(d, 0x48),
            btf_size: u64_at(d, 0x50),
            init_top_pgt_phys: u64_at(d, 0x58),
            jiffies_64: u64_at(d, 0x60),
            nr_threads: u64_at(d, 0x68),
            linux_banner: u64_at(d, 0x70),
            pgtable_levels: u32_at(d, 0x78),
            nr_cpu_ids: u32_at(d, 0x7c),
            per_cpu_offset: u64_at(d, 0x80),
            total_forks: u64_at(d, 0x88),
            fork_users: fork_users(d)?,
            runqueues: (d.len() >= STATE_SIZE_RUNQUEUES)
                .then(|| u64_at(d, 0xa0))
                .filter(|&a| a != 0),
        })
    } else {
        None
    };
    Ok((header, state))
}

/// The per-user fork table named by descriptor `d`, if it is long enough to name one; its number
/// of entries and entry size must be ones this monitor reads.
fn fork_users(d: &[u8]) -> Result<Option<(u64, u32, u32)>, SbError> {
    if d.len() < STATE_SIZE_FORK_USERS {
        return Ok(None);
    }
    let (addr, nr, size) = (u64_at(d, 0x90), u32_at(d, 0x98), u32_at(d, 0x9c));
    if !(1..=MAX_FORK_USERS).contains(&nr) {
        return Err(SbError::Malformed(format!(
            "the descriptor's per-user fork table has {nr} entries (expected 1..={MAX_FORK_USERS})"
        )));
    }
    if size != FORK_USER_SIZE {
        return Err(SbError::Malformed(format!(
            "the descriptor's per-user fork table has {size}-byte entries (this monitor reads \
             {FORK_USER_SIZE}-byte ones)"
        )));
    }
    Ok(Some((addr, nr, size)))
}

/// Reads a consistent copy of the Sensor Box at `gpa` (a region of `size` bytes): copies it until
/// the sequence counter is even and unchanged across the copy, at most `attempts` times.
pub fn read(mem: &dyn PhysMem, gpa: u64, size: u64, attempts: u32) -> Result<SensorBox, SbError> {
    copy(mem, gpa, size, attempts, |_| true).and_then(|c| parse(&c, gpa))
}

/// Tries of [`copy`] that only spin before it sleeps [`RETRY_SLEEP`] between tries.
const SPINS_BEFORE_SLEEP: u32 = 8;
/// How long [`copy`] sleeps between later tries: `attempts` bounds the time a copy can take to
/// about `attempts × RETRY_SLEEP` (50 ms for 1,000).
pub const RETRY_SLEEP: std::time::Duration = std::time::Duration::from_micros(50);

/// The raw bytes of a consistent copy (see [`read`]): what a bridge serves. `allowed(len)` is asked,
/// before each copy, whether `[gpa, gpa + len)` may be read — the length comes from the guest's
/// header, so it cannot be checked earlier.
pub fn copy(
    mem: &dyn PhysMem,
    gpa: u64,
    size: u64,
    attempts: u32,
    allowed: impl Fn(u64) -> bool,
) -> Result<Vec<u8>, SbError> {
    let size = size.min(MAX_REGION);
    let mut header = [0u8; HEADER_SIZE];
    for attempt in 0..attempts.max(1) {
        // A writer caught mid-publish is usually done within microseconds; but a writer whose vCPU
        // thread is not running (a busy host, nested virtualization) stays mid-publish until it
        // runs again, so after a few spins give the CPU away between tries.
        if attempt >= SPINS_BEFORE_SLEEP {
            std::thread::sleep(RETRY_SLEEP);
        } else if attempt > 0 {
            std::hint::spin_loop();
        }
        mem.read(gpa, &mut header)?;
        let ext = extent(&header, size)?;
        if !allowed(ext) {
            return Err(SbError::NotAllowed(ext));
        }
        let seq = u64_at(&header, 0x30);
        if seq % 2 == 1 {
            continue;
        }
        let len = usize::try_from(ext).map_err(|_| SbError::NotAllowed(ext))?;
        let mut copy = vec![0u8; len];
        mem.read(gpa, &mut copy)?;
        if mem.read_u64(gpa + 0x30)? == seq && u64_at(&copy, 0x30) == seq {
            return Ok(copy);
        }
    }
    Err(SbError::Torn(attempts))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mem::VecMem;

    /// A well-formed Sensor Box image with two sensors and a mailbox.
    pub(crate) fn image() -> Vec<u8> {
        let mut b = vec![0u8; 0x4000];
        b[0..8].copy_from_slice(MAGIC);
        let put32 =
            |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
        let put64 =
            |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        put32(&mut b, 0x08, 1);
        put32(&mut b, 0x0c, 256);
        put32(&mut b, 0x10, 0x4000);
        put32(&mut b, 0x14, 64);
        put32(&mut b, 0x18, 0x100);
        put32(&mut b, 0x1c, 64);
        put32(&mut b, 0x20, 2);
        put32(&mut b, 0x24, 250);
        put64(&mut b, 0x30, 42);
        put32(&mut b, 0x48, 0x1100);
        put32(&mut b, 0x4c, 0x100);
        put32(&mut b, 0x50, 0x2000);
        put32(&mut b, 0x54, 64 + 64 * 32);
        for (i, (id, class, flags, t, v, name)) in [
            (ids::NPROCS, 2u16, 1u16, 4096u64, 55u64, "NPROCS"),
            (ids::FREE_PAGES, 2, 3, 1024, 100, "FREE_PAGES"),
        ]
        .into_iter()
        .enumerate()
        {
            let o = 0x100 + i * 64;
            put32(&mut b, o, id);
            b[o + 4..o + 6].copy_from_slice(&class.to_le_bytes());
            b[o + 6..o + 8].copy_from_slice(&flags.to_le_bytes());
            put64(&mut b, o + 8, t);
            put64(&mut b, o + 16, v);
            b[o + 32..o + 32 + name.len()].copy_from_slice(name.as_bytes());
        }
        put32(&mut b, 0x1100, 1);
        put32(&mut b, 0x1104, 0x100);
        put64(&mut b, 0x1100 + 0x38, 0xffff_ffff_8260_0000);
        put64(&mut b, 0x1100 + 0x90, 0xffff_ffff_8290_0000);
        put32(&mut b, 0x1100 + 0x98, 64);
        put32(&mut b, 0x1100 + 0x9c, 24);
        put32(&mut b, 0x2000, 64);
        put32(&mut b, 0x2004, 32);
        b
    }

    #[test]
    fn a_progress_sensor_says_how_long_it_has_not_advanced() {
        let s = Sensor {
            id: ids::CPU_PROGRESS,
            class: SensorClass::Progress,
            flags: FLAG_VALID,
            threshold: 2000,
            value: 7,
            updated: 1000,
            name: "CPU_PROGRESS".into(),
        };
        assert_eq!(s.stalled_ms(1750, 250), Some(3000));
        assert_eq!(s.stalled_ms(900, 250), Some(0));
        assert_eq!(s.stalled_ms(1750, 0), None, "a virtual view");
        let level = Sensor {
            class: SensorClass::Level,
            ..s
        };
        assert_eq!(level.stalled_ms(1750, 250), None);
    }

    #[test]
    fn encode_round_trips_through_parse() {
        let sensors: Vec<Sensor> = (0..100)
            .map(|i| Sensor {
                id: 1000 + i,
                class: SensorClass::Level,
                flags: FLAG_VALID,
                threshold: 10 * u64::from(i),
                value: u64::from(i),
                updated: 7,
                name: format!("S{i}"),
            })
            .collect();
        let img = encode(&sensors, 250, 4);
        assert_eq!(img.len(), 16 << 10);
        let sb = parse(&img, 0x100_0000).unwrap();
        assert_eq!(sb.sensors, sensors);
        assert_eq!(sb.hooks_gpa(), Some(0x100_2000));
    }

    #[test]
    fn parses_a_well_formed_box() {
        let sb = parse(&image(), 0x1ff0_0000).unwrap();
        assert_eq!(sb.header.hz, 250);
        assert_eq!(sb.value(ids::NPROCS), Some(55));
        let free = sb.sensor(ids::FREE_PAGES).unwrap();
        assert_eq!(free.name, "FREE_PAGES");
        assert!(
            free.level_violated(),
            "100 free pages < 1024 with LOWER_BOUND"
        );
        assert!(!sb.sensor(ids::NPROCS).unwrap().level_violated());
        assert_eq!(sb.state.as_ref().unwrap().init_task, 0xffff_ffff_8260_0000);
        assert_eq!(
            sb.state.as_ref().unwrap().fork_users,
            Some((0xffff_ffff_8290_0000, 64, 24))
        );
        assert_eq!(sb.hooks_gpa(), Some(0x1ff0_2000));
    }

    #[test]
    fn rejects_lies_in_the_header() {
        let mut b = image();
        b[0x20] = 200; // count > capacity
        assert!(matches!(parse(&b, 0), Err(SbError::Malformed(_))));
        let mut b = image();
        b[0x1c..0x20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse(&b, 0), Err(SbError::Malformed(_))));
        let mut b = image();
        b[0x50..0x54].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert!(matches!(parse(&b, 0), Err(SbError::Malformed(_))));
        let mut b = image();
        b[0] = b'X';
        assert!(matches!(parse(&b, 0), Err(SbError::BadMagic(_))));
        assert!(parse(&image()[..100], 0).is_err());
    }

    #[test]
    fn the_fork_table_is_optional_and_checked() {
        let set_state_size =
            |b: &mut Vec<u8>, n: u32| b[0x4c..0x50].copy_from_slice(&n.to_le_bytes());
        // A kernel before patch 0005: a 0x90-byte descriptor and no table.
        let mut b = image();
        set_state_size(&mut b, 0x90);
        let st = parse(&b, 0).unwrap().state.unwrap();
        assert_eq!(st.init_task, 0xffff_ffff_8260_0000);
        assert_eq!(st.fork_users, None);
        // Shorter than the base descriptor: no descriptor at all.
        set_state_size(&mut b, 0x88);
        assert_eq!(parse(&b, 0).unwrap().state, None);
        // Exactly 0xa0 bytes names it.
        let mut b = image();
        set_state_size(&mut b, 0xa0);
        assert_eq!(
            parse(&b, 0).unwrap().state.unwrap().fork_users,
            Some((0xffff_ffff_8290_0000, 64, 24))
        );
        // Bad entry counts and sizes are refused with a message that says which.
        for (at, v, what) in [
            (0x98, 0u32, "0 entries"),
            (0x98, MAX_FORK_USERS + 1, "4097 entries"),
            (0x98, u32::MAX, "entries"),
            (0x9c, 16, "16-byte entries"),
            (0x9c, 0, "0-byte entries"),
        ] {
            let mut b = image();
            b[0x1100 + at..0x1100 + at + 4].copy_from_slice(&v.to_le_bytes());
            match parse(&b, 0) {
                Err(SbError::Malformed(m)) => assert!(m.contains(what), "{m}"),
                other => panic!("{at:#x}={v}: {other:?}"),
            }
        }
        let mut b = image();
        b[0x1100 + 0x98..0x1100 + 0x9c].copy_from_slice(&MAX_FORK_USERS.to_le_bytes());
        assert!(parse(&b, 0).is_ok());
    }

    #[test]
    fn a_box_that_never_settles_is_reported_torn() {
        let mut b = image();
        b[0x30] = 43; // odd: forever mid-update
        let mem = VecMem::new(0x1000, b);
        assert_eq!(read(&mem, 0x1000, 0x4000, 5), Err(SbError::Torn(5)));
        mem.write(0x1030, &[44]).unwrap();
        assert_eq!(read(&mem, 0x1000, 0x4000, 5).unwrap().header.seq, 44);
    }
}
