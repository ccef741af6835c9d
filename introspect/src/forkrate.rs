//! Who forks how fast: the guest kernel's per-user fork table, the one behind the
//! `MAXPROC_RATE_PERUID` sensor, found through the Sensor Box's externalized-state descriptor
//! (patch 0005, layout in `guest-kernel-patches/README.md`) and read with one copy.
//!
//! The kernel counts every fork against the caller's real uid in 1 s windows (`jiffies_64 / HZ`),
//! so the table names a fork storm's user even when the storm's processes are too short-lived to
//! show up in the task list. Read it with the guest paused, together with the Sensor Box whose
//! `jiffies` and `hz` say which window is the current one.
//!
//! The table comes from an untrusted guest: its address must lie in the kernel image, its size is
//! bounded before anything is allocated, and no entry can make this code panic.

use crate::conv::usize_from;
use crate::kernel::{KernelLocation, START_KERNEL_MAP};
use crate::mem::{MemError, PhysMem};
use crate::sensorbox::{ExternalState, FORK_USER_SIZE, MAX_FORK_USERS};

/// The kernel image must lie below this (the module area starts here; as in `kernel`).
const KERNEL_IMAGE_END: u64 = 0xffff_ffff_c000_0000;

/// Why the fork rates could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForkRateError {
    /// The descriptor names no table.
    #[error("the guest kernel does not name its per-user fork table (its Sensor Box descriptor predates patch 0005); boot a kernel built from the whole guest-kernel-patches series")]
    NoTable,
    /// The descriptor's entry count or size is not one this code reads.
    #[error("per-user fork table with {nr} entries of {size} bytes: expected 1..={MAX_FORK_USERS} entries of {FORK_USER_SIZE} bytes")]
    BadShape {
        /// Number of entries.
        nr: u32,
        /// Size of one entry.
        size: u32,
    },
    /// The table's address is not an aligned range of the kernel image.
    #[error("per-user fork table at {addr:#x} (+{len:#x} bytes) is not an aligned range of the kernel image ({START_KERNEL_MAP:#x}..{KERNEL_IMAGE_END:#x}); the Sensor Box descriptor is corrupt")]
    OutsideImage {
        /// Kernel virtual address of the table.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// HZ of 0 leaves no window to compute.
    #[error("HZ is 0: take hz from the Sensor Box header of a booted guest")]
    ZeroHz,
    /// Memory could not be read.
    #[error(transparent)]
    Mem(#[from] MemError),
}

/// One user's fork rate: forks in the current or the previous 1 s window, whichever is more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ForkRate {
    /// Real uid.
    pub uid: u32,
    /// Forks per window.
    pub rate: u32,
}

/// The kernel's rule for the rate of one entry (`uid`, `count`, `prev`, `window`) in window `w`:
/// `max(count, prev)` if `window == w`, `count` if `window + 1 == w`, otherwise 0.
pub fn entry_rate(count: u32, prev: u32, window: u64, w: u64) -> u32 {
    if window == w {
        count.max(prev)
    } else if window.checked_add(1) == Some(w) {
        count
    } else {
        0
    }
}

/// The fork rate of every user that forked in window `jiffies / hz` or the one before, busiest
/// first (ties by uid), read from the table `st` names in one copy through `loc`'s kernel-image
/// mapping. Pass the `jiffies` and `hz` of a Sensor Box header read in the same pause. Users with
/// rate 0 are left out; should the guest list a uid twice, its larger rate counts.
pub fn per_user_fork_rates(
    mem: &dyn PhysMem,
    loc: &KernelLocation,
    st: &ExternalState,
    jiffies: u64,
    hz: u32,
) -> Result<Vec<ForkRate>, ForkRateError> {
    let (addr, nr, size) = st.fork_users.ok_or(ForkRateError::NoTable)?;
    if !(1..=MAX_FORK_USERS).contains(&nr) || size != FORK_USER_SIZE {
        return Err(ForkRateError::BadShape { nr, size });
    }
    if hz == 0 {
        return Err(ForkRateError::ZeroHz);
    }
    // At most MAX_FORK_USERS * FORK_USER_SIZE (96 KiB).
    let len = u64::from(nr) * u64::from(size);
    let in_image = addr >= START_KERNEL_MAP
        && addr % 8 == 0
        && addr
            .checked_add(len)
            .is_some_and(|end| end <= KERNEL_IMAGE_END);
    if !in_image {
        return Err(ForkRateError::OutsideImage { addr, len });
    }
    let mut table = vec![0u8; usize_from(len)];
    mem.read(loc.image_phys(addr), &mut table)?;
    Ok(rates(&table, jiffies / u64::from(hz)))
}

/// Rates in window `w` of the 24-byte entries in `table`, busiest first.
fn rates(table: &[u8], w: u64) -> Vec<ForkRate> {
    // Entries are exactly FORK_USER_SIZE (24) bytes, so every field is there.
    let u32_at = |e: &[u8], o: usize| crate::le::u32_at(e, o).unwrap_or(0);
    let mut out: Vec<ForkRate> = Vec::new();
    for e in table.chunks_exact(FORK_USER_SIZE as usize) {
        let window = u64::from(u32_at(e, 0x10)) | u64::from(u32_at(e, 0x14)) << 32;
        let rate = entry_rate(u32_at(e, 0x04), u32_at(e, 0x08), window, w);
        if rate == 0 {
            continue;
        }
        let uid = u32_at(e, 0x00);
        match out.iter_mut().find(|r| r.uid == uid) {
            Some(r) => r.rate = r.rate.max(rate),
            None => out.push(ForkRate { uid, rate }),
        }
    }
    out.sort_by(|a, b| b.rate.cmp(&a.rate).then(a.uid.cmp(&b.uid)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::VecMem;

    const HZ: u32 = 250;
    const W: u64 = 1000;
    const TABLE: u64 = 0xffff_ffff_8290_0000;
    const PHYS_BASE: u64 = 0x0100_0000;

    fn loc() -> KernelLocation {
        KernelLocation {
            slide: 0,
            phys_base: PHYS_BASE,
            page_offset_base: 0xffff_8880_0000_0000,
            cr3: 0x1000,
            levels: 4,
        }
    }

    fn state(addr: u64, nr: u32, size: u32) -> ExternalState {
        ExternalState {
            fork_users: Some((addr, nr, size)),
            ..ExternalState::default()
        }
    }

    /// A 64-entry table at `TABLE` (guest-physical `image_phys(TABLE)`) holding `entries`
    /// (uid, count, prev, window); the rest is zero, like the kernel's unused entries.
    fn guest(entries: &[(u32, u32, u32, u64)]) -> VecMem {
        let mut b = vec![0u8; 64 * 24];
        for (i, &(uid, count, prev, window)) in entries.iter().enumerate() {
            let e = &mut b[i * 24..(i + 1) * 24];
            e[0..4].copy_from_slice(&uid.to_le_bytes());
            e[4..8].copy_from_slice(&count.to_le_bytes());
            e[8..12].copy_from_slice(&prev.to_le_bytes());
            e[12..16].copy_from_slice(&0xdead_beefu32.to_le_bytes()); // padding is ignored
            e[16..24].copy_from_slice(&window.to_le_bytes());
        }
        VecMem::new(loc().image_phys(TABLE), b)
    }

    fn read(mem: &VecMem, st: &ExternalState) -> Result<Vec<ForkRate>, ForkRateError> {
        per_user_fork_rates(mem, &loc(), st, W * u64::from(HZ) + 17, HZ)
    }

    #[test]
    fn rates_follow_the_kernel_rule_busiest_first() {
        let mem = guest(&[
            (1000, 5, 9, W),       // current window: max(count, prev)
            (1001, 12, 3, W),      // current window, count larger
            (1002, 7, 100, W - 1), // previous window: its count only
            (1003, 50, 50, W - 2), // older: stale
            (1004, 0, 0, W),       // no forks
            (1005, 40, 40, W + 1), // a window the header has not reached: not counted
            (1006, 8, 0, u64::MAX),
        ]);
        let got = read(&mem, &state(TABLE, 64, 24)).unwrap();
        assert_eq!(
            got,
            vec![
                ForkRate {
                    uid: 1001,
                    rate: 12
                },
                ForkRate { uid: 1000, rate: 9 },
                ForkRate { uid: 1002, rate: 7 },
            ]
        );
        assert_eq!(entry_rate(3, 4, u64::MAX, 0), 0);
        assert_eq!(entry_rate(3, 4, u64::MAX - 1, u64::MAX), 3);
    }

    #[test]
    fn a_user_listed_twice_counts_once_with_the_larger_rate_and_ties_go_by_uid() {
        let mem = guest(&[(7, 3, 0, W), (5, 4, 0, W), (7, 9, 1, W - 1), (6, 4, 0, W)]);
        let got = read(&mem, &state(TABLE, 64, 24)).unwrap();
        let pairs: Vec<(u32, u32)> = got.iter().map(|r| (r.uid, r.rate)).collect();
        assert_eq!(pairs, vec![(7, 9), (5, 4), (6, 4)]);
    }

    #[test]
    fn an_idle_guest_has_no_rates() {
        let mem = guest(&[]);
        assert_eq!(read(&mem, &state(TABLE, 64, 24)).unwrap(), vec![]);
        // Early in boot, window 0 against an all-zero table: still nothing.
        assert_eq!(
            per_user_fork_rates(&mem, &loc(), &state(TABLE, 64, 24), 3, HZ).unwrap(),
            vec![]
        );
    }

    #[test]
    fn fewer_entries_than_the_memory_holds_reads_only_those() {
        let mem = guest(&[(1, 1, 0, W), (2, 2, 0, W)]);
        let got = read(&mem, &state(TABLE, 1, 24)).unwrap();
        assert_eq!(got, vec![ForkRate { uid: 1, rate: 1 }]);
    }

    #[test]
    fn bad_shapes_are_refused() {
        let mem = guest(&[(1000, 5, 0, W)]);
        assert_eq!(
            read(&mem, &ExternalState::default()),
            Err(ForkRateError::NoTable)
        );
        for (nr, size) in [
            (0, 24),
            (MAX_FORK_USERS + 1, 24),
            (u32::MAX, 24),
            (64, 16),
            (64, 0),
        ] {
            assert_eq!(
                read(&mem, &state(TABLE, nr, size)),
                Err(ForkRateError::BadShape { nr, size }),
                "{nr} x {size}"
            );
        }
        assert_eq!(
            per_user_fork_rates(&mem, &loc(), &state(TABLE, 64, 24), 1, 0),
            Err(ForkRateError::ZeroHz)
        );
    }

    #[test]
    fn addresses_outside_the_kernel_image_are_refused() {
        let mem = guest(&[(1000, 5, 0, W)]);
        for addr in [
            0,
            0x0000_7fff_ffff_0000,          // user space
            0xffff_8880_0100_0000,          // the direct map
            START_KERNEL_MAP - 8,           // just below the image
            TABLE + 4,                      // misaligned
            KERNEL_IMAGE_END,               // the module area
            KERNEL_IMAGE_END - 64 * 24 + 8, // runs past the end of the image
            u64::MAX - 7,                   // wraps around
        ] {
            assert!(
                matches!(
                    read(&mem, &state(addr, 64, 24)),
                    Err(ForkRateError::OutsideImage { addr: a, .. }) if a == addr
                ),
                "{addr:#x}"
            );
        }
        // In the image but not backed by guest RAM: a memory error, not a panic.
        assert!(matches!(
            read(&mem, &state(TABLE + 0x10_0000, 64, 24)),
            Err(ForkRateError::Mem(MemError::OutOfRange { .. }))
        ));
    }

    #[test]
    fn garbage_tables_never_panic() {
        // A simple xorshift fills the table with every kind of value.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..200 {
            let mut bytes = vec![0u8; 64 * 24];
            for b in bytes.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x.to_le_bytes()[0];
            }
            let mem = VecMem::new(loc().image_phys(TABLE), bytes);
            let jiffies = if round % 2 == 0 { x } else { u64::MAX };
            let rates = per_user_fork_rates(&mem, &loc(), &state(TABLE, 64, 24), jiffies, 1)
                .expect("a readable table always gives rates");
            assert!(rates.windows(2).all(|p| p[0].rate >= p[1].rate));
            assert!(rates.iter().all(|r| r.rate > 0));
        }
    }
}
