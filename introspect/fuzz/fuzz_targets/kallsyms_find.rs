//! kallsyms are searched for in a guest's read-only data, which is untrusted: any bytes must end in
//! a table or an error, never a panic, a hang or an unbounded allocation. The input is searched as
//! it is, and also split around a well-formed token table and index, so that the fuzzer spends its
//! time on what follows a found token table (markers, names, counts, offsets).
#![no_main]
use libfuzzer_sys::fuzz_target;

fn token_table() -> Vec<u8> {
    let mut table = Vec::new();
    let mut index = Vec::new();
    for i in 0u16..256 {
        index.extend_from_slice(&(table.len() as u16).to_le_bytes());
        let b = i as u8;
        if (0x21..0x7f).contains(&b) {
            table.push(b);
        } else {
            table.extend_from_slice(format!("{b:02x}").as_bytes());
        }
        table.push(0);
    }
    while table.len() % 8 != 0 {
        table.push(0);
    }
    table.extend_from_slice(&index);
    table
}

fuzz_target!(|data: &[u8]| {
    let _ = introspect::kallsyms::find(data, 0);
    let split = data.first().map_or(0, |&b| usize::from(b) * 8).min(data.len());
    let mut before = data[..split].to_vec();
    while before.len() % 8 != 0 {
        before.push(0);
    }
    let region = [before.as_slice(), &token_table(), &data[split..]].concat();
    let _ = introspect::kallsyms::find(&region, 0xffff_ffff_8200_0000);
});
