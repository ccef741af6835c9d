//! Page tables and task lists in guest memory are untrusted: walking arbitrary memory must end
//! in a table or an error, within bounds, never a panic or a hang.
#![no_main]
use introspect::mem::VecMem;
use introspect::paging::PageWalker;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let cr3 = u64::from_le_bytes(data[0..8].try_into().unwrap()) & 0xffff;
    let va = u64::from_le_bytes(data[8..16].try_into().unwrap());
    let mem = VecMem::new(0, data[16..].to_vec());
    for levels in [4u8, 5] {
        if let Ok(pw) = PageWalker::new(&mem, cr3, levels) {
            let mut buf = [0u8; 64];
            let _ = pw.read(va, &mut buf);
        }
    }
    introspect::tasks::fuzz_walk(&mem, data);
});
