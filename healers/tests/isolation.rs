//! One monitor, many guests: a guest whose bridge never answers does not delay the sampling of a
//! healthy one. The healthy guest is a memory image served by a real bridge (TLS on loopback); the
//! dead one is a TCP port that accepts connections and then says nothing.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use bdmon::config::Config;
use bdmon::events::Events;
use bdmon::metrics::Metrics;
use introspect::sensorbox::{self, Sensor, SensorClass};
use rdma_bridge::backend::DumpBackend;
use rdma_bridge::config::BridgeConfig;
use rdma_bridge::server::Server;
use rdma_bridge::tls;

fn samples(metrics: &Metrics, guest: &str) -> f64 {
    let key = format!("bdmon_samples_total{{guest=\"{guest}\"}} ");
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&key)?.parse().ok())
        .unwrap_or(0.0)
}

/// A PKI in `dir/pki` with a certificate for monitor `mon1`.
fn pki(dir: &std::path::Path) -> std::path::PathBuf {
    let pki = dir.join("pki");
    tls::pki_init(&pki, tls::DEFAULT_SERVER_NAME).unwrap();
    tls::pki_issue(&pki, "mon1").unwrap();
    pki
}

/// A port that accepts, then never speaks: a TLS handshake with it hangs until the client's
/// timeout.
fn silent_port() -> std::net::SocketAddr {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming().flatten() {
            held.push(c);
        }
    });
    addr
}

#[test]
fn a_dead_guest_never_delays_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let sensors = vec![Sensor {
        id: 3,
        class: SensorClass::Level,
        flags: 1,
        threshold: 1000,
        value: 10,
        updated: 0,
        name: "NPROCS".into(),
    }];
    let mut ram = vec![0u8; 4 << 20];
    let sb = sensorbox::encode(&sensors, 250, 2);
    ram[0x10_0000..0x10_0000 + sb.len()].copy_from_slice(&sb);
    std::fs::write(dir.path().join("mem"), &ram).unwrap();
    std::fs::write(
        dir.path().join("bridge.toml"),
        "listen = \"127.0.0.1:0\"\naudit_log = \"audit.jsonl\"\n[tls]\nca = \"pki/ca.pem\"\n\
         cert = \"pki/bridge.pem\"\nkey = \"pki/bridge.key\"\n[[monitor]]\nname = \"mon1\"\n\
         cert = \"pki/mon1.pem\"\nread = [\"sb\"]\n",
    )
    .unwrap();
    let bcfg = BridgeConfig::load(&dir.path().join("bridge.toml")).unwrap();
    let backend = DumpBackend::open(&dir.path().join("mem"), (0x10_0000, 1 << 20)).unwrap();
    let server = Server::bind(&bcfg, Arc::new(backend)).unwrap();
    let live = server.local_addr().unwrap();
    std::thread::spawn(move || server.run());
    let dead = silent_port();

    let text = format!(
        "sample_ms = 10\n\
         [[guest]]\nname = \"dead\"\nbridge = \"{dead}\"\npki = \"{p}\"\nmonitor = \"mon1\"\n\
         [[guest]]\nname = \"live\"\nbridge = \"{live}\"\npki = \"{p}\"\nmonitor = \"mon1\"\n",
        p = pki.display()
    );
    let cfg = Arc::new(Config::parse(&text, &dir.path().join("bdmon.toml")).unwrap());
    let metrics = Arc::new(Metrics::default());
    let events = Arc::new(Events::to_writer(Box::new(std::io::sink())));
    let h = bdmon::dispatcher::start(
        cfg,
        Arc::new(bdmon::default_registry),
        events,
        metrics.clone(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let (l, d) = (samples(&metrics, "live"), samples(&metrics, "dead"));
    // 3 s at 10 ms is 300 periods; allow for a loaded machine.
    assert!(l >= 150.0, "the live guest was sampled only {l} times");
    assert_eq!(d, 0.0, "the dead guest answered?");
    // On demand: a wake-up samples at once, between periods.
    assert!(h.sample_now("live"));
    h.stop();
}

/// Removing a guest does not wait for the work its loop is in the middle of (here a session
/// that hangs until the client's 10 s timeout; in a fleet, a repair when the monitor is fenced or
/// loses the guest): the caller goes on at once, and the name cannot be watched twice until
/// the old loop has ended.
#[test]
fn removing_a_guest_in_the_middle_of_a_step_does_not_wait_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let dead = silent_port();
    let text = format!(
        "sample_ms = 10\n\
         [[guest]]\nname = \"dead\"\nbridge = \"{dead}\"\npki = \"{p}\"\nmonitor = \"mon1\"\n",
        p = pki.display()
    );
    let cfg = Arc::new(Config::parse(&text, &dir.path().join("bdmon.toml")).unwrap());
    let g = cfg.guests[0].clone();
    let h = bdmon::dispatcher::start(
        cfg,
        Arc::new(bdmon::default_registry),
        Arc::new(Events::to_writer(Box::new(std::io::sink()))),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    // The first step (on the blocking pool: the kernel kind is not known yet) is now stuck in
    // the TLS handshake with the silent port.
    std::thread::sleep(Duration::from_millis(500));
    assert!(h.remove("dead"));
    assert!(h.watched().is_empty());
    assert!(h.ending("dead"), "remove waited for the stuck step to end");
    assert!(
        !h.add(g.clone()),
        "a second loop for a guest whose first is still ending"
    );
    // The stuck handshake ends at the client's timeout, and the loop with it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while h.ending("dead") {
        assert!(
            std::time::Instant::now() < deadline,
            "the removed loop never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(h.add(g), "the name is free again once its old loop ended");
    assert!(h.remove("dead"));
    h.stop();
}
