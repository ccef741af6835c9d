//! The decoder never allocates more than the bytes a peer actually sent, whatever length it
//! announces. Measured with a counting global allocator, which is why this test is a binary of its
//! own: the allocator applies to everything in the process, and no other test should run under it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bridge_client::wire::{encode, Decoder, Frame, Header, Op, Request, MAX_PAYLOAD, VERSION};

/// Records the largest single allocation made by the current thread.
struct TrackMax;

thread_local! {
    static MAX_ALLOC: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = MAX_ALLOC.try_with(|m| m.set(m.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping only touches
// a const-initialised thread-local Cell, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for TrackMax {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: TrackMax = TrackMax;

fn reset_max_alloc() {
    MAX_ALLOC.with(|m| m.set(0));
}

fn max_alloc() -> usize {
    MAX_ALLOC.with(|m| m.get())
}

#[test]
fn huge_declared_payload_allocates_only_what_arrived() {
    // A valid header announcing the maximal payload, followed by a little of it.
    let mut b = Header {
        version: VERSION,
        op: Op::Write as u8,
        flags: 0,
        request_id: 1,
        payload_len: MAX_PAYLOAD,
    }
    .to_bytes()
    .to_vec();
    b.extend_from_slice(&[0; 100]);
    reset_max_alloc();
    let mut d = Decoder::new();
    for chunk in b.chunks(7) {
        d.push(chunk).unwrap();
        assert_eq!(d.next_frame(), Ok(None));
    }
    assert!(max_alloc() < 4096, "allocated {} bytes", max_alloc());

    // A complete large frame, fed in small chunks: no allocation beyond the frame's size.
    let f = Frame::request(
        2,
        Request::Write {
            gpa: 0,
            bytes: vec![7; 1 << 20],
        },
    );
    let b = encode(&f).unwrap();
    let mut d = Decoder::new();
    reset_max_alloc();
    let mut got = None;
    for chunk in b.chunks(1000) {
        d.push(chunk).unwrap();
        if let Some(x) = d.next_frame().unwrap() {
            got = Some(x);
        }
    }
    assert!(
        max_alloc() <= b.len(),
        "allocated {} > {}",
        max_alloc(),
        b.len()
    );
    assert_eq!(got, Some(f));
}
