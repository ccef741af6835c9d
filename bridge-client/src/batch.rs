//! Splitting many reads into as few batched requests as a transport's limits allow.
//!
//! A [`crate::client::Transport`] that can read many ranges in one round trip (the bridge's
//! `READ_BATCH`) says how much one batch may carry ([`BatchLimits`]); [`plan`] cuts a list of
//! reads, in order, into consecutive groups that each fit. A range too large to share a batch
//! goes alone (as a plain read).

use std::ops::Range;

use crate::wire::{MAX_BATCH_RANGES, MAX_PAYLOAD};

/// What one batched read may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most ranges in one batch.
    pub max_ranges: usize,
    /// Most bytes of one batch's reply, its framing included.
    pub max_reply: u64,
    /// Reply bytes a batch spends on itself.
    pub reply_header: u64,
    /// Reply bytes each range costs besides its data.
    pub per_range: u64,
}

impl BatchLimits {
    /// The bridge's `READ_BATCH` (the limits of [`crate::wire`], which the bridge enforces too):
    /// at most [`MAX_BATCH_RANGES`] ranges, and a reply of a `u16` count plus a `u32` length and
    /// the bytes of each range within one frame ([`MAX_PAYLOAD`]).
    pub fn wire() -> BatchLimits {
        BatchLimits {
            max_ranges: usize::from(MAX_BATCH_RANGES),
            max_reply: u64::from(MAX_PAYLOAD),
            reply_header: 2,
            per_range: 4,
        }
    }

    /// Whether `ranges` ranges holding `bytes` data bytes in all fit one batch.
    pub fn fits(&self, ranges: usize, bytes: u64) -> bool {
        let Ok(n) = u64::try_from(ranges) else {
            return false;
        };
        let reply = n
            .checked_mul(self.per_range)
            .and_then(|r| r.checked_add(self.reply_header))
            .and_then(|r| r.checked_add(bytes));
        ranges <= self.max_ranges && reply.is_some_and(|r| r <= self.max_reply)
    }
}

/// Cuts reads of `lens` bytes each, in order, into consecutive groups (index ranges into
/// `lens`), each one batch within `limits`; a group of one is a range that could not share a
/// batch (or the last one left), for a plain read. Every index is in exactly one group.
pub fn plan(lens: &[u32], limits: &BatchLimits) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0usize;
    let mut bytes = 0u64;
    for (i, &len) in lens.iter().enumerate() {
        let len = u64::from(len);
        if i > start && !limits.fits(i - start + 1, bytes.saturating_add(len)) {
            groups.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes = bytes.saturating_add(len);
    }
    if start < lens.len() {
        groups.push(start..lens.len());
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::cell::Cell;
    use std::rc::Rc;

    use introspect::mem::{MemError, PhysMem, VecMem};

    use crate::client::{Transport, TransportMem};

    /// A transport over a byte vector that batches like the bridge and counts its requests.
    struct Fake {
        mem: VecMem,
        batches: bool,
        reads: Rc<Cell<u32>>,
        batch_calls: Rc<Cell<u32>>,
    }

    impl Transport for Fake {
        fn read_mem(&mut self, gpa: u64, len: u32) -> Result<Vec<u8>, MemError> {
            self.reads.set(self.reads.get() + 1);
            let mut b = vec![0u8; usize::try_from(len).unwrap()];
            self.mem.read(gpa, &mut b)?;
            Ok(b)
        }
        fn write_mem(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemError> {
            self.mem.write(gpa, bytes)
        }
        fn batch_limits(&self) -> Option<BatchLimits> {
            self.batches.then(BatchLimits::wire)
        }
        fn read_batch_mem(&mut self, ranges: &[(u64, u32)]) -> Result<Vec<Vec<u8>>, MemError> {
            assert!(
                BatchLimits::wire().fits(ranges.len(), ranges.iter().map(|r| u64::from(r.1)).sum())
            );
            self.batch_calls.set(self.batch_calls.get() + 1);
            ranges
                .iter()
                .map(|&(gpa, len)| {
                    let mut b = vec![0u8; usize::try_from(len).unwrap()];
                    self.mem.read(gpa, &mut b).map(|()| b)
                })
                .collect()
        }
    }

    type Counters = (Rc<Cell<u32>>, Rc<Cell<u32>>);

    fn fake(batches: bool) -> (TransportMem<Fake>, Counters) {
        let bytes: Vec<u8> = (0..4u32 << 20).map(|i| i.to_le_bytes()[1]).collect();
        let (reads, batch_calls) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
        let t = Fake {
            mem: VecMem::new(0, bytes),
            batches,
            reads: reads.clone(),
            batch_calls: batch_calls.clone(),
        };
        (TransportMem::new(t), (reads, batch_calls))
    }

    #[test]
    fn transport_mem_reads_many_ranges_in_one_round_trip_per_batch() {
        for batches in [true, false] {
            let (m, (reads, batch_calls)) = fake(batches);
            // 600 scattered 100-byte reads (and an empty one, which costs nothing).
            let gpas: Vec<u64> = (0..600u64).map(|k| (k * 7919 % 1000) * 4096 + 13).collect();
            let mut bufs = vec![vec![0u8; 100]; 600];
            let mut empty = [0u8; 0];
            let mut ranges: Vec<(u64, &mut [u8])> = gpas
                .iter()
                .zip(bufs.iter_mut())
                .map(|(&g, b)| (g, b.as_mut_slice()))
                .collect();
            ranges.push((0, &mut empty[..]));
            m.read_many(&mut ranges).unwrap();
            for (g, b) in gpas.iter().zip(&bufs) {
                let mut want = vec![0u8; 100];
                m.transport().mem.read(*g, &mut want).unwrap();
                assert_eq!(b, &want);
            }
            if batches {
                assert_eq!((reads.get(), batch_calls.get()), (0, 3));
                assert_eq!(m.round_trips(), 3);
            } else {
                assert_eq!((reads.get(), batch_calls.get()), (600, 0));
                assert_eq!(m.round_trips(), 600);
            }
        }
    }

    #[test]
    fn a_lone_range_is_a_plain_read_and_errors_come_back() {
        let (m, (reads, batch_calls)) = fake(true);
        let mut b = [0u8; 8];
        m.read_many(&mut [(4096, &mut b[..])]).unwrap();
        assert_eq!((reads.get(), batch_calls.get()), (1, 0));
        assert_eq!(b, [16; 8]);
        let mut c = [0u8; 8];
        assert!(m
            .read_many(&mut [(0, &mut b[..]), (4 << 20, &mut c[..])])
            .is_err());
    }

    #[test]
    fn the_wire_limits_are_the_bridges() {
        let w = BatchLimits::wire();
        assert!(w.fits(256, 4096 * 256));
        assert!(!w.fits(257, 0));
        // 2 + 4 + len must fit 16 MiB.
        assert!(w.fits(1, u64::from(MAX_PAYLOAD) - 6));
        assert!(!w.fits(1, u64::from(MAX_PAYLOAD) - 5));
        assert!(w.fits(2, u64::from(MAX_PAYLOAD) - 10));
        assert!(!w.fits(2, u64::from(MAX_PAYLOAD) - 9));
        assert!(!w.fits(usize::MAX, u64::MAX));
    }

    #[test]
    fn plans_cover_every_range_once_in_order_within_the_limits() {
        let w = BatchLimits::wire();
        assert!(plan(&[], &w).is_empty());
        assert_eq!(plan(&[8], &w), vec![0..1]);
        // 600 pages: 256 + 256 + 88.
        let pages = vec![4096u32; 600];
        assert_eq!(plan(&pages, &w), vec![0..256, 256..512, 512..600]);
        // Large reads: two of 6 MiB share a batch, the third does not fit with them.
        let big = 6u32 << 20;
        assert_eq!(plan(&[big, big, big, 8], &w), vec![0..2, 2..4]);
        // A read as large as a frame goes alone, between its neighbours' batches.
        let huge = MAX_PAYLOAD - 6;
        assert_eq!(plan(&[8, 8, huge, 8], &w), vec![0..2, 2..3, 3..4]);
        // Too large even alone: still its own group (the plain read reports the error).
        assert_eq!(plan(&[u32::MAX, 8], &w), vec![0..1, 1..2]);
        let tiny = BatchLimits {
            max_ranges: 3,
            max_reply: 100,
            reply_header: 0,
            per_range: 0,
        };
        assert_eq!(
            plan(&[10, 20, 30, 40, 50, 60, 70], &tiny),
            vec![0..3, 3..5, 5..6, 6..7]
        );
    }
}
