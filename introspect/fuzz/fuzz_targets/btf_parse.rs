//! BTF from a guest is untrusted: parsing and querying arbitrary bytes must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = introspect::btf::Btf::parse(data) {
        for name in [
            "task_struct",
            "mm_struct",
            "cred",
            "list_head",
            "signal_struct",
        ] {
            if let Ok(l) = btf.struct_layout(name) {
                let _ = l.offset("pid");
            }
        }
        let _ = btf.field_offset("task_struct", "thread_info.flags");
        let _ = btf.enum_constant("NR_FREE_PAGES");
    }
    let _ = introspect::elf::section(data, ".BTF");
});
