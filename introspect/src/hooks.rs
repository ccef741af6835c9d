//! The repair-hook mailbox of a patched guest (layout in `guest-kernel-patches/README.md`): how a
//! monitor asks the guest kernel to kill, stop or continue a process or every process of a user,
//! or to renice every process of a user.
//!
//! Write requests only while the guest's vCPUs are paused; the kernel acts on them at its next
//! timer tick after the guest resumes.

use crate::mem::{MemError, PhysMem};
use crate::sensorbox::SensorBox;

const HEADER: u64 = 64;
const SLOT_SIZE: u32 = 32;
/// Most slots we accept from a mailbox header.
pub const MAX_SLOTS: u32 = 1024;

const STATE_FREE: u32 = 0;
const STATE_REQUESTED: u32 = 1;
const STATE_DONE: u32 = 2;
const STATE_REJECTED: u32 = 3;

/// What to kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillTarget {
    /// The thread group of this pid; `start_time` (ns since boot, 0 = unchecked) guards against
    /// the pid having been reused.
    Pid {
        /// Process id.
        pid: u32,
        /// The task's `start_time`.
        start_time: u64,
    },
    /// Every process whose real uid is this.
    Uid(u32),
}

/// What to do to a [`KillTarget`]: the request kinds of the mailbox (patch 0004 kills, patch
/// 0006 the rest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// SIGKILL (`KILL_PID` 1, `KILL_UID` 2).
    Kill,
    /// SIGSTOP (`STOP_PID` 3, `STOP_UID` 4): reversible with [`Order::Cont`].
    Stop,
    /// SIGCONT (`CONT_PID` 5, `CONT_UID` 6).
    Cont,
    /// Set the nice value of every thread of every process of a user (`RENICE_UID` 7; -20..=19).
    Renice(i8),
}

impl Order {
    /// The request kind for `target`, and the 8-byte argument at slot offset 0x10.
    fn kind(self, target: KillTarget) -> Result<(u32, u32, u64), HookError> {
        Ok(match (self, target) {
            (Order::Kill, KillTarget::Pid { pid, start_time }) => (1, pid, start_time),
            (Order::Kill, KillTarget::Uid(uid)) => (2, uid, 0),
            (Order::Stop, KillTarget::Pid { pid, start_time }) => (3, pid, start_time),
            (Order::Stop, KillTarget::Uid(uid)) => (4, uid, 0),
            (Order::Cont, KillTarget::Pid { pid, start_time }) => (5, pid, start_time),
            (Order::Cont, KillTarget::Uid(uid)) => (6, uid, 0),
            (Order::Renice(nice), KillTarget::Uid(uid)) if (-20..=19).contains(&nice) => {
                // A signed 64-bit nice, two's complement.
                (7, uid, u64::from_le_bytes(i64::from(nice).to_le_bytes()))
            }
            (Order::Renice(nice), KillTarget::Uid(_)) => {
                return Err(HookError::Unsupported(format!(
                    "nice {nice} (the kernel takes -20..=19)"
                )))
            }
            (Order::Renice(_), KillTarget::Pid { .. }) => {
                return Err(HookError::Unsupported(
                    "renice of one process (the mailbox renices a whole user)".into(),
                ))
            }
        })
    }

    /// "kill", "stop", "cont" or "renice".
    pub fn as_str(self) -> &'static str {
        match self {
            Order::Kill => "kill",
            Order::Stop => "stop",
            Order::Cont => "cont",
            Order::Renice(_) => "renice",
        }
    }
}

/// As its name ([`Order::as_str`]): events say `"order": "renice"`.
impl serde::Serialize for Order {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The state of one mailbox slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Unused.
    Free,
    /// Waiting for the kernel.
    Requested,
    /// Carried out; the number of processes signalled.
    Done(u32),
    /// Refused; the errno the kernel gave.
    Rejected(u32),
    /// A value the layout does not define (the guest wrote garbage).
    Invalid(u32),
}

/// Why a request could not be posted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HookError {
    /// Memory access failed.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// The guest has no mailbox.
    #[error("this guest's Sensor Box has no repair-hook mailbox")]
    NoMailbox,
    /// The mailbox header is malformed.
    #[error("malformed repair-hook mailbox: {0}")]
    Malformed(String),
    /// A request the mailbox has no kind for.
    #[error("the repair-hook mailbox cannot carry {0}")]
    Unsupported(String),
    /// Every slot holds a pending request.
    #[error("all {0} repair-hook slots are busy; wait for the guest to process them")]
    Full(u32),
}

/// Counters of the mailbox header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MailboxCounters {
    /// Requests announced by monitors.
    pub doorbell: u64,
    /// The doorbell value the kernel last acted on.
    pub processed: u64,
    /// Requests carried out.
    pub applied: u64,
    /// Requests rejected.
    pub rejected: u64,
}

/// A validated view of a guest's mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mailbox {
    gpa: u64,
    slots: u32,
}

impl Mailbox {
    /// Finds and checks the mailbox named by `sb`.
    pub fn open(mem: &dyn PhysMem, sb: &SensorBox) -> Result<Self, HookError> {
        let gpa = sb.hooks_gpa().ok_or(HookError::NoMailbox)?;
        let size = u64::from(sb.header.hooks.1);
        let slots = mem.read_u32(gpa)?;
        let slot_size = mem.read_u32(gpa + 4)?;
        if slot_size != SLOT_SIZE || slots == 0 || slots > MAX_SLOTS {
            return Err(HookError::Malformed(format!(
                "{slots} slots of {slot_size} bytes"
            )));
        }
        if HEADER + u64::from(slots) * u64::from(SLOT_SIZE) > size {
            return Err(HookError::Malformed(format!(
                "{slots} slots do not fit {size} bytes"
            )));
        }
        Ok(Self { gpa, slots })
    }

    fn slot_gpa(&self, i: u32) -> u64 {
        self.gpa + HEADER + u64::from(i) * u64::from(SLOT_SIZE)
    }

    /// Number of slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Posts a kill request and rings the doorbell; returns the slot used. The guest must be
    /// paused.
    ///
    /// The whole 32-byte slot — its state `REQUESTED` included — is written in **one** write, then
    /// the doorbell in a second: over a bridge each is one WRITE, so a request is never seen (nor
    /// built, by two posters interleaving) half old and half new. With `k = 1` the bridge applies
    /// WRITEs only from the lock's holder, so two monitors cannot post at once; with k-of-n the
    /// monitors' identical writes are the request.
    pub fn post(&self, mem: &dyn PhysMem, target: KillTarget, tag: u64) -> Result<u32, HookError> {
        self.request(mem, Order::Kill, target, tag)
    }

    /// Posts `order` for `target` and rings the doorbell, as [`Mailbox::post`] does a kill;
    /// returns the slot used. The guest must be paused.
    pub fn request(
        &self,
        mem: &dyn PhysMem,
        order: Order,
        target: KillTarget,
        tag: u64,
    ) -> Result<u32, HookError> {
        let (kind, id, arg) = order.kind(target)?;
        let slot = (0..self.slots)
            .find(|&i| {
                mem.read_u32(self.slot_gpa(i))
                    .is_ok_and(|s| s != STATE_REQUESTED)
            })
            .ok_or(HookError::Full(self.slots))?;
        let mut bytes = [0u8; 32];
        bytes[0..4].copy_from_slice(&STATE_REQUESTED.to_le_bytes());
        bytes[4..8].copy_from_slice(&kind.to_le_bytes());
        bytes[8..12].copy_from_slice(&id.to_le_bytes());
        // 12..16: the result, zero until the kernel sets it.
        // start_time for the *_PID kinds, the nice value for RENICE_UID.
        bytes[16..24].copy_from_slice(&arg.to_le_bytes());
        bytes[24..32].copy_from_slice(&tag.to_le_bytes());
        mem.write(self.slot_gpa(slot), &bytes)?;
        let doorbell = mem.read_u64(self.gpa + 8)?;
        mem.write(self.gpa + 8, &doorbell.wrapping_add(1).to_le_bytes())?;
        Ok(slot)
    }

    /// The state of slot `i`.
    pub fn slot(&self, mem: &dyn PhysMem, i: u32) -> Result<SlotState, HookError> {
        if i >= self.slots {
            return Err(HookError::Malformed(format!("no slot {i}")));
        }
        let g = self.slot_gpa(i);
        let state = mem.read_u32(g)?;
        let result = mem.read_u32(g + 12)?;
        Ok(match state {
            STATE_FREE => SlotState::Free,
            STATE_REQUESTED => SlotState::Requested,
            STATE_DONE => SlotState::Done(result),
            STATE_REJECTED => SlotState::Rejected(result),
            other => SlotState::Invalid(other),
        })
    }

    /// The header counters.
    pub fn counters(&self, mem: &dyn PhysMem) -> Result<MailboxCounters, HookError> {
        Ok(MailboxCounters {
            doorbell: mem.read_u64(self.gpa + 8)?,
            processed: mem.read_u64(self.gpa + 16)?,
            applied: mem.read_u64(self.gpa + 24)?,
            rejected: mem.read_u64(self.gpa + 32)?,
        })
    }

    /// Writes raw bytes into slot `i` (for tests of the kernel's validation) and rings the bell.
    pub fn post_raw(&self, mem: &dyn PhysMem, i: u32, bytes: &[u8; 32]) -> Result<(), HookError> {
        if i >= self.slots {
            return Err(HookError::Malformed(format!("no slot {i}")));
        }
        mem.write(self.slot_gpa(i), bytes)?;
        let doorbell = mem.read_u64(self.gpa + 8)?;
        mem.write(self.gpa + 8, &doorbell.wrapping_add(1).to_le_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::VecMem;
    use crate::sensorbox::{parse, tests::image};

    #[test]
    fn posting_fills_a_slot_and_rings_the_doorbell() {
        let img = image();
        let sb = parse(&img, 0x10_0000).unwrap();
        let mem = VecMem::new(0x10_0000, img);
        let mb = Mailbox::open(&mem, &sb).unwrap();
        assert_eq!(mb.slots(), 64);
        let s = mb
            .post(
                &mem,
                KillTarget::Pid {
                    pid: 1234,
                    start_time: 99,
                },
                7,
            )
            .unwrap();
        assert_eq!(s, 0);
        assert_eq!(mb.slot(&mem, 0).unwrap(), SlotState::Requested);
        assert_eq!(mb.counters(&mem).unwrap().doorbell, 1);
        // The next request takes the next slot while the first is pending.
        assert_eq!(mb.post(&mem, KillTarget::Uid(1000), 8).unwrap(), 1);
        // The kernel finishes slot 0; it becomes reusable.
        mem.write(mb.slot_gpa(0), &STATE_DONE.to_le_bytes())
            .unwrap();
        mem.write(mb.slot_gpa(0) + 12, &1u32.to_le_bytes()).unwrap();
        assert_eq!(mb.slot(&mem, 0).unwrap(), SlotState::Done(1));
        assert_eq!(mb.post(&mem, KillTarget::Uid(1001), 9).unwrap(), 0);
    }

    /// Remembers every write, in order.
    struct Recording {
        mem: VecMem,
        writes: std::cell::RefCell<Vec<(u64, Vec<u8>)>>,
    }

    impl PhysMem for Recording {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.mem.read(gpa, buf)
        }
        fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), MemError> {
            self.writes.borrow_mut().push((gpa, bytes.to_vec()));
            self.mem.write(gpa, bytes)
        }
    }

    #[test]
    fn a_post_is_one_write_of_the_whole_slot_then_the_doorbell() {
        let img = image();
        let sb = parse(&img, 0x10_0000).unwrap();
        let mem = Recording {
            mem: VecMem::new(0x10_0000, img),
            writes: Default::default(),
        };
        let mb = Mailbox::open(&mem, &sb).unwrap();
        let target = KillTarget::Pid {
            pid: 1234,
            start_time: 0x0102_0304_0506_0708,
        };
        assert_eq!(mb.post(&mem, target, 7).unwrap(), 0);
        let writes = mem.writes.borrow().clone();
        assert_eq!(writes.len(), 2, "slot, then doorbell: {writes:x?}");
        let (gpa, slot) = &writes[0];
        assert_eq!(*gpa, mb.slot_gpa(0));
        let mut want = Vec::new();
        want.extend(STATE_REQUESTED.to_le_bytes());
        want.extend(1u32.to_le_bytes());
        want.extend(1234u32.to_le_bytes());
        want.extend(0u32.to_le_bytes());
        want.extend(0x0102_0304_0506_0708u64.to_le_bytes());
        want.extend(7u64.to_le_bytes());
        assert_eq!(slot, &want);
        assert_eq!(writes[1], (mb.gpa + 8, 1u64.to_le_bytes().to_vec()));
        assert_eq!(mb.slot(&mem, 0).unwrap(), SlotState::Requested);
    }

    #[test]
    fn each_order_has_its_kind_and_argument() {
        let img = image();
        let sb = parse(&img, 0).unwrap();
        let mem = VecMem::new(0, img);
        let mb = Mailbox::open(&mem, &sb).unwrap();
        let pid = KillTarget::Pid {
            pid: 42,
            start_time: 5,
        };
        let uid = KillTarget::Uid(1000);
        let cases = [
            (Order::Stop, pid, 3u32, 42u32, 5u64),
            (Order::Stop, uid, 4, 1000, 0),
            (Order::Cont, pid, 5, 42, 5),
            (Order::Cont, uid, 6, 1000, 0),
            (Order::Renice(19), uid, 7, 1000, 19),
            (Order::Renice(-3), uid, 7, 1000, u64::MAX - 2),
        ];
        for (i, (order, target, kind, id, arg)) in cases.into_iter().enumerate() {
            let slot = mb.request(&mem, order, target, 1).unwrap();
            assert_eq!(slot, u32::try_from(i).unwrap());
            let g = mb.slot_gpa(slot);
            assert_eq!(mem.read_u32(g + 4).unwrap(), kind, "{order:?}");
            assert_eq!(mem.read_u32(g + 8).unwrap(), id);
            assert_eq!(mem.read_u64(g + 16).unwrap(), arg);
        }
        for bad in [(Order::Renice(20), uid), (Order::Renice(0), pid)] {
            assert!(matches!(
                mb.request(&mem, bad.0, bad.1, 1),
                Err(HookError::Unsupported(_))
            ));
        }
    }

    #[test]
    fn a_lying_mailbox_header_is_refused() {
        let mut img = image();
        img[0x2000..0x2004].copy_from_slice(&100_000u32.to_le_bytes());
        let sb = parse(&img, 0).unwrap();
        let mem = VecMem::new(0, img);
        assert!(matches!(
            Mailbox::open(&mem, &sb),
            Err(HookError::Malformed(_))
        ));
    }
}
