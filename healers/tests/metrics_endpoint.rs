//! The metrics endpoint against slow, hostile and numerous clients (issue 12, hole 10).
//!
//! Each test uses `Metrics::serve` with its default limits, so it states what every bdmon with
//! `metrics = ...` in its config does.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bdmon::metrics::Metrics;

/// How long a test client waits for an answer before it calls the endpoint stuck. A bound so a
/// regression fails instead of hanging; never compared against.
const STUCK: Duration = Duration::from_secs(20);

fn endpoint() -> SocketAddr {
    let m = Arc::new(Metrics::default());
    m.add("bdmon_samples_total", &[("guest", "vm1")], 3.0);
    m.serve("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// Sends a whole request and reads the whole answer (or what came before the endpoint closed).
fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(STUCK)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// True while the endpoint has neither closed nor reset `s`.
fn still_connected(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let open = matches!((&*s).read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

#[test]
fn a_trickling_client_does_not_delay_another_scrape() {
    let addr = endpoint();
    let slow = TcpStream::connect(addr).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let mut s = slow.try_clone().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            // A request that never ends, one byte at a time (as a slowloris would send it).
            for b in b"GET /metrics HTTP/1.0\r\nX-Slow: "
                .iter()
                .chain([b'a'; 4096].iter())
            {
                if stop.load(Ordering::SeqCst) || s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Let the slow client be accepted first.
    std::thread::sleep(Duration::from_millis(200));
    let answer = scrape(addr);
    let slow_still_there = still_connected(&slow);
    stop.store(true, Ordering::SeqCst);
    trickler.join().unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 200 OK"),
        "second client got: {answer:?}"
    );
    assert!(
        answer.contains("bdmon_samples_total{guest=\"vm1\"} 3"),
        "{answer}"
    );
    assert!(
        slow_still_there,
        "the slow client should still have been connected when the other was answered"
    );
}

#[test]
fn a_one_mib_request_line_is_cut_off() {
    let addr = endpoint();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(STUCK)).unwrap();
    let mut w = s.try_clone().unwrap();
    // The endpoint stops reading long before the end, so the write may fail: that is the point.
    let writer = std::thread::spawn(move || {
        let line = vec![b'a'; 1 << 20];
        let _ = w.write_all(b"GET /");
        let _ = w.write_all(&line);
    });
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    writer.join().unwrap();
    let answer = String::from_utf8_lossy(&out);
    assert!(
        answer.starts_with("HTTP/1.0 414"),
        "expected a 414 answer to a 1 MiB request line, got {:?}",
        &answer[..answer.len().min(200)]
    );
    // And the endpoint still serves.
    assert!(scrape(addr).starts_with("HTTP/1.0 200 OK"));
}

#[test]
fn clients_beyond_the_pool_are_refused_at_once() {
    let addr = endpoint();
    // Four silent clients fill the default pool (connections are accepted in order).
    let idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let answer = scrape(addr);
    assert!(
        answer.starts_with("HTTP/1.0 503"),
        "a fifth client should be refused while four hold the pool, got {answer:?}"
    );
    assert!(
        idle.iter().all(still_connected),
        "the pool's clients should still have been connected when the fifth was refused"
    );
}
