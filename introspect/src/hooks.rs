//! The repair-hook mailbox of a patched guest (layout in `guest-kernel-patches/README.md`): how a
//! monitor asks the guest kernel to kill a process or every process of a user.
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
        let slot = (0..self.slots)
            .find(|&i| {
                mem.read_u32(self.slot_gpa(i))
                    .is_ok_and(|s| s != STATE_REQUESTED)
            })
            .ok_or(HookError::Full(self.slots))?;
        let (kind, id, start_time) = match target {
            KillTarget::Pid { pid, start_time } => (1u32, pid, start_time),
            KillTarget::Uid(uid) => (2u32, uid, 0),
        };
        let mut bytes = [0u8; 32];
        bytes[0..4].copy_from_slice(&STATE_REQUESTED.to_le_bytes());
        bytes[4..8].copy_from_slice(&kind.to_le_bytes());
        bytes[8..12].copy_from_slice(&id.to_le_bytes());
        // 12..16: the result, zero until the kernel sets it.
        bytes[16..24].copy_from_slice(&start_time.to_le_bytes());
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
