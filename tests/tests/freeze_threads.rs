//! `bd-kvmhost freeze-threads`, the kvm engine's "halted CPU" fault, on this machine: a real
//! multi-threaded program (C, built here) whose threads `vcpu0` and `vcpu1` count while its main
//! thread counts too. Freezing `vcpu*` must stop both vCPU counters and leave the main thread
//! running (a stop signal would stop all three); killing the tracer must let them go on.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use backdoors_tests::kvmhost::freeze::Thaw;

const TARGET_C: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
static volatile unsigned long counts[3];
static void *count(void *arg) {
    long i = (long)arg;
    char name[16];
    snprintf(name, sizeof name, "vcpu%ld", i);
    pthread_setname_np(pthread_self(), name);
    struct timespec t = {0, 1000000};
    for (;;) { counts[i]++; nanosleep(&t, 0); }
    return 0;
}
int main(int argc, char **argv) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", argv[1]);
    pthread_t t[2];
    for (long i = 0; i < 2; i++) pthread_create(&t[i], 0, count, (void *)i);
    struct timespec tick = {0, 1000000};
    for (;;) {
        counts[2]++;
        FILE *f = fopen(tmp, "w");
        if (f) {
            fprintf(f, "%lu %lu %lu\n", counts[0], counts[1], counts[2]);
            fclose(f);
            rename(tmp, argv[1]);
        }
        nanosleep(&tick, 0);
    }
}
"#;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The three counters (the file is replaced whole by rename, never seen half written).
fn counts(p: &Path) -> [u64; 3] {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let v: Vec<u64> = s
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    [0, 1, 2].map(|i| v.get(i).copied().unwrap_or(0))
}

/// The counters as the main thread wrote them after this call began: it writes every
/// millisecond, but on a loaded machine the last write may be older than the freeze; two
/// writes later the file shows the threads' state after it.
fn fresh(p: &Path) -> [u64; 3] {
    let start = counts(p)[2];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = counts(p);
        if c[2] >= start + 2 || std::time::Instant::now() > deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn advance(p: &Path) -> [bool; 3] {
    let a = fresh(p);
    std::thread::sleep(Duration::from_millis(400));
    let b = fresh(p);
    [0, 1, 2].map(|i| b[i] > a[i])
}

#[test]
fn frozen_vcpu_threads_stop_alone_and_go_on_when_the_tracer_dies() {
    let dir = tempfile::tempdir().unwrap();
    let (src, exe, out) = (
        dir.path().join("t.c"),
        dir.path().join("bdfreezeme"),
        dir.path().join("counts"),
    );
    std::fs::write(&src, TARGET_C).unwrap();
    let st = Command::new("cc")
        .args(["-O1", "-pthread", "-o"])
        .arg(&exe)
        .arg(&src)
        .status()
        .expect("cc");
    assert!(st.success(), "cc failed");
    let _target = Kill(
        Command::new(&exe)
            .arg(&out)
            .stdin(Stdio::null())
            .spawn()
            .expect("target"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while counts(&out)[0] == 0 {
        assert!(std::time::Instant::now() < deadline, "target never counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        advance(&out),
        [true, true, true],
        "all three count at first"
    );

    let pidfile = dir.path().join("tracer.pid");
    let got = Command::new(env!("CARGO_BIN_EXE_bd-kvmhost"))
        .args(["freeze-threads", "--comm", "bdfreezeme", "--cmdline"])
        .arg(&out)
        .arg("--pidfile")
        .arg(&pidfile)
        .output()
        .expect("bd-kvmhost");
    let stdout = String::from_utf8_lossy(&got.stdout).to_string();
    assert!(
        got.status.success() && stdout.contains("threads=2"),
        "freeze-threads: {stdout}{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let tracer: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("tracer pid");
    let mut thaw = Thaw::new(tracer);
    assert!(stdout.contains(&format!("tracer={tracer}")), "{stdout}");
    assert_eq!(
        advance(&out),
        [false, false, true],
        "the vCPU threads stop, the main thread goes on"
    );
    // A nonexistent thread prefix and a nonexistent process are clear errors.
    let bad = Command::new(env!("CARGO_BIN_EXE_bd-kvmhost"))
        .args([
            "freeze-threads",
            "--comm",
            "no-such-comm",
            "--cmdline",
            "x",
            "--pidfile",
        ])
        .arg(dir.path().join("no.pid"))
        .output()
        .expect("bd-kvmhost");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no process named"));

    assert!(thaw.now(), "the tracer was gone before the thaw");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        advance(&out),
        [true, true, true],
        "the tracer is gone: every thread counts again"
    );
}
