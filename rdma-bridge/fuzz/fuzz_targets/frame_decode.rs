//! Frames come from untrusted peers: any bytes, in any chunking, must decode to frames or a
//! `WireError`, never a panic; and whatever decodes must re-encode to exactly the bytes it came from.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rdma_bridge::wire::{decode, encode, Decoder};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode(data) {
        assert_eq!(encode(&frame).as_deref(), Ok(data));
    }

    // The first byte picks the chunk size for the streaming decoder (1..=256 bytes).
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk) + 1;
    let mut d = Decoder::with_limits(1 << 16, 1 << 17);
    let mut consumed = 0;
    for piece in stream.chunks(chunk) {
        if d.push(piece).is_err() {
            return;
        }
        loop {
            match d.next_frame() {
                Ok(Some(frame)) => {
                    let bytes = encode(&frame).expect("a decoded frame re-encodes");
                    assert_eq!(&stream[consumed..consumed + bytes.len()], &bytes[..]);
                    consumed += bytes.len();
                }
                Ok(None) => break,
                Err(_) => {
                    assert!(d.is_poisoned());
                    return;
                }
            }
        }
    }
    assert_eq!(consumed + d.buffered(), stream.len());
});
