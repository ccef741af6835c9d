//! Cost of State Box export and import through `statebox::Region`: median and p99 in ns of
//! 20000 single calls each, for 256 B and 10 KiB of data (the same figures as `c/bench.c`).
//!
//! Run: `cargo bench -p statebox --bench export`.

#[cfg(target_os = "linux")]
fn main() {
    use std::hint::black_box;
    use std::time::Instant;

    use statebox::Region;

    const ITERATIONS: usize = 20_000;
    const SIZES: [usize; 2] = [256, 10 * 1024];

    let mut region = match Region::create(4, 16 * 1024) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("export bench: {e}");
            std::process::exit(1);
        }
    };
    let mut out = Vec::with_capacity(16 * 1024);
    let mut ns = Vec::with_capacity(ITERATIONS);
    for (i, size) in SIZES.into_iter().enumerate() {
        let id = u64::try_from(i).unwrap_or(0) + 1;
        let b = match region.create_box(id) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("export bench: {e}");
                std::process::exit(1);
            }
        };
        let data: Vec<u8> = (0..size).map(|i| i.to_le_bytes()[0]).collect();

        ns.clear();
        for _ in 0..ITERATIONS {
            let t = Instant::now();
            let r = region.export(&b, black_box(&data));
            ns.push(t.elapsed().as_nanos());
            if let Err(e) = r {
                eprintln!("export bench: {e}");
                std::process::exit(1);
            }
        }
        report("rust export", size, &mut ns);

        ns.clear();
        for _ in 0..ITERATIONS {
            let t = Instant::now();
            let r = region.import(&b, black_box(&mut out));
            ns.push(t.elapsed().as_nanos());
            if let Err(e) = r {
                eprintln!("import bench: {e}");
                std::process::exit(1);
            }
        }
        assert_eq!(out, data, "import returned other data than exported");
        report("rust import", size, &mut ns);
    }
}

/// Prints one line: what, size, median and p99 in ns.
#[cfg(target_os = "linux")]
fn report(what: &str, size: usize, ns: &mut [u128]) {
    ns.sort_unstable();
    let at = |q: usize| ns.get((ns.len() * q / 100).min(ns.len().saturating_sub(1)));
    let (Some(median), Some(p99)) = (at(50), at(99)) else {
        return;
    };
    println!(
        "{what} {size} B: median {median} ns, p99 {p99} ns ({} iterations)",
        ns.len()
    );
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("the State Box region exists on Linux only");
}
