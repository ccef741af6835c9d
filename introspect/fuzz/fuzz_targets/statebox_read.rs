//! A State Box region read through hostile page tables and hostile region bytes: the fuzz input
//! is the guest's physical memory (the page-table root at 0) and, on its own, a region image.
#![no_main]

use introspect::mem::VecMem;
use introspect::paging::PageWalker;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = statebox::abi::parse_region(data);
    let mut ram = data.to_vec();
    ram.resize(ram.len().max(4096), 0);
    let mem = VecMem::new(0, ram);
    if let Ok(pw) = PageWalker::new(&mem, 0, 4) {
        let _ = introspect::statebox::read_through(&pw, 1, 0, "fuzz");
    }
});
