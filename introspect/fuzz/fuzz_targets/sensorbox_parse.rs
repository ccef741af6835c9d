//! A Sensor Box is written by the guest: any bytes must parse to a box or an error.
#![no_main]
use introspect::mem::VecMem;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = introspect::sensorbox::parse(data, 0x0f0_0000);
    let mem = VecMem::new(0x0f0_0000, data.to_vec());
    if let Ok(sb) = introspect::sensorbox::read(&mem, 0x0f0_0000, data.len() as u64, 3) {
        if let Ok(mb) = introspect::hooks::Mailbox::open(&mem, &sb) {
            let _ = mb.post(&mem, introspect::hooks::KillTarget::Uid(1000), 1);
            let _ = mb.slot(&mem, 0);
        }
    }
});
