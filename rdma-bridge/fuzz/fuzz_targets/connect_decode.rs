//! RDMA connect blobs come from untrusted peers (the RDMA_CONNECT payload): any bytes must decode
//! to an endpoint and a region table or a `VerbsError`, never a panic. The format is canonical (no
//! padding, no unknown flags, reserved bytes and unused GID bytes zero, nothing after the last
//! record), so whatever decodes must re-encode to exactly the bytes it came from, and those decode
//! to the same value. Needs no `verbs` feature: the codec is always built.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rdma_bridge::verbs::{decode_connect, encode_connect, CONNECT_MAGIC, CONNECT_VERSION};

fn check(blob: &[u8]) {
    let Ok((endpoint, regions)) = decode_connect(blob) else {
        return;
    };
    let again = encode_connect(&endpoint, &regions).expect("a decoded blob re-encodes");
    assert_eq!(again, blob, "re-encoding changed the bytes");
    let (endpoint2, regions2) = decode_connect(&again).expect("a re-encoded blob decodes");
    assert_eq!(endpoint2, endpoint);
    assert_eq!(regions2, regions);
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // The same bytes behind a valid magic and version, so that mutations reach the fields behind
    // them instead of dying at the first check.
    let mut blob = Vec::with_capacity(data.len() + 5);
    blob.extend_from_slice(&CONNECT_MAGIC);
    blob.push(CONNECT_VERSION);
    blob.extend_from_slice(data);
    check(&blob);
});
