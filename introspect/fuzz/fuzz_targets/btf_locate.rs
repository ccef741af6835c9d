//! A guest's BTF blob is located by its header in untrusted read-only data: any bytes must end in
//! a parsed blob or nothing, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((at, len, btf)) = introspect::btf::locate::find(data) {
        assert!(at + len <= data.len());
        let _ = btf.struct_layout("task_struct");
    }
});
