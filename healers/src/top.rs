//! `bdmon top`: a live terminal view of every guest of a config — its vCPUs' state, each
//! sensor's value with a sparkline of its recent samples (per-sample increments for progress
//! counters), the contract's verdict, the guest's last events from the event log and the time
//! bdmon's repairs held it paused.
//!
//! It only reads: Sensor Boxes and the vCPU state through the guests' bridges (FETCH_SB and
//! STATUS, which never pause a guest; a stock guest's kernel is located once, as `bdmon status`
//! does) and the event log that `bdmon run` writes. One thread samples the guests in turn; the
//! terminal thread draws and reads keys, so an unreachable guest never freezes the screen.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use introspect::sensorbox::{Sensor, SensorBox, SensorClass};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table, TableState};
use ratatui::Frame;
use serde_json::Value;

use crate::config::{Config, GuestConfig};
use crate::contract::Checker;
use crate::guest::Guest;

/// Samples kept per sensor for its sparkline.
pub const HISTORY: usize = 60;
/// Events kept per guest.
const EVENTS_KEPT: usize = 50;
/// At most this much of the event log is read per refresh (a huge backlog is caught up over
/// several refreshes rather than in one long stall).
const EVENTS_READ_MAX: u64 = 4 << 20;
const SPARK: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// `values` as a sparkline scaled between their minimum and maximum (flat: the lowest bar).
pub fn sparkline(values: impl IntoIterator<Item = u64>) -> String {
    let v: Vec<u64> = values.into_iter().collect();
    let (Some(&lo), Some(&hi)) = (v.iter().min(), v.iter().max()) else {
        return String::new();
    };
    let span = u128::from(hi - lo);
    v.iter()
        .map(|&x| {
            // Rounded to the nearest of the 8 bars, in integers (no overflow: u128); a flat
            // series has no span and sits on the lowest bar.
            let i = (u128::from(x - lo) * 7 + span / 2)
                .checked_div(span)
                .unwrap_or(0);
            SPARK[usize::try_from(i).unwrap_or(7).min(7)]
        })
        .collect()
}

/// What the sampler thread saw of one guest.
enum Reading {
    /// Its Sensor Box and its vCPUs' state as words ("running", "paused", …).
    Sampled(Box<SensorBox>, String),
    /// Why it could not be read.
    Unreadable(String),
}

/// One sample of one guest, from the sampler thread.
struct Sample {
    guest: usize,
    reading: Reading,
}

/// A guest's state on the screen.
enum Shown {
    NotYet,
    /// Its vCPUs' state.
    Vcpus(String),
    /// Why it could not be read.
    Unreadable(String),
}

/// What the screen shows of one guest.
struct GuestView {
    name: String,
    bridge: String,
    checker: Checker,
    state: Shown,
    sensors: Vec<Sensor>,
    bad: HashSet<u32>,
    history: HashMap<u32, VecDeque<u64>>,
    last: HashMap<u32, u64>,
    sampled: Option<Instant>,
    samples: u64,
    events: VecDeque<String>,
    repairs: u64,
    lock_total_us: u64,
    lock_last_us: Option<u64>,
}

impl GuestView {
    fn new(g: &GuestConfig) -> GuestView {
        GuestView {
            name: g.name.clone(),
            bridge: g.bridge.clone(),
            checker: Checker::new(g.threshold_overrides()).with_names(g.threshold_names()),
            state: Shown::NotYet,
            sensors: Vec::new(),
            bad: HashSet::new(),
            history: HashMap::new(),
            last: HashMap::new(),
            sampled: None,
            samples: 0,
            events: VecDeque::new(),
            repairs: 0,
            lock_total_us: 0,
            lock_last_us: None,
        }
    }

    fn take(&mut self, r: Reading) {
        let (sb, state) = match r {
            Reading::Sampled(sb, state) => (*sb, state),
            Reading::Unreadable(why) => {
                self.state = Shown::Unreadable(why);
                return;
            }
        };
        let now = Instant::now();
        self.bad = self.checker.check(&sb, now).iter().map(|v| v.id).collect();
        for s in &sb.sensors {
            // A progress counter's value means nothing by itself: its increments do.
            let point = match s.class {
                SensorClass::Progress => match self.last.get(&s.id) {
                    Some(&prev) => s.value.saturating_sub(prev),
                    None => {
                        self.last.insert(s.id, s.value);
                        continue;
                    }
                },
                _ => s.value,
            };
            self.last.insert(s.id, s.value);
            let h = self.history.entry(s.id).or_default();
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(point);
        }
        self.sensors = sb.sensors;
        self.state = Shown::Vcpus(state);
        self.sampled = Some(now);
        self.samples += 1;
    }

    fn take_event(&mut self, e: &Value) {
        let kind = e["event"].as_str().unwrap_or("?");
        if kind == "repair" && e["dry_run"] != true {
            self.repairs += 1;
            if let Some(us) = e["lock_held_us"].as_u64() {
                self.lock_total_us = self.lock_total_us.saturating_add(us);
                self.lock_last_us = Some(us);
            }
        }
        let when = e["ts_ms"].as_u64().map_or_else(|| "--:--:--".into(), clock);
        let mut rest: Vec<String> = e
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| !matches!(k.as_str(), "ts_ms" | "guest" | "event"))
            .map(|(k, v)| format!("{k}={}", compact(v)))
            .collect();
        rest.sort();
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events
            .push_back(format!("{when} {kind:<10} {}", rest.join(" ")));
    }
}

/// A JSON value as one short token.
fn compact(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.chars().count() > 40 {
        let cut: String = s.chars().take(39).collect();
        format!("{cut}…")
    } else {
        s
    }
}

/// Unix ms as UTC HH:MM:SS.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", s / 3600 % 24, s / 60 % 60, s % 60)
}

/// Follows the event log: new complete lines since the last call (none if there is no log).
struct Tail {
    path: Option<std::path::PathBuf>,
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    fn new(events: &str) -> Tail {
        Tail {
            path: (events != "-").then(|| events.into()),
            offset: 0,
            partial: Vec::new(),
        }
    }

    fn lines(&mut self) -> Vec<Value> {
        let Some(path) = &self.path else {
            return Vec::new();
        };
        let Ok(mut f) = std::fs::File::open(path) else {
            return Vec::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Truncated or replaced: start again.
            self.offset = 0;
            self.partial.clear();
        }
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        let got = f.take(EVENTS_READ_MAX).read_to_end(&mut buf).unwrap_or(0);
        self.offset += got as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let whole: Vec<u8> = self.partial.drain(..=end).collect();
        whole
            .split(|&b| b == b'\n')
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect()
    }
}

/// Samples every guest in turn, every `every`, until `stop`.
fn sampler(guests: Vec<GuestConfig>, every: Duration, tx: Sender<Sample>, stop: Arc<AtomicBool>) {
    let mut gs: Vec<Guest> = guests.into_iter().map(Guest::new).collect();
    while !stop.load(Ordering::SeqCst) {
        let next = Instant::now() + every;
        for (i, g) in gs.iter_mut().enumerate() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let reading = match g.sample() {
                Ok(sb) => {
                    let state = match g.status() {
                        Ok(s) if s.state == 0 => "running".to_string(),
                        Ok(s) if s.state == 1 => "paused".to_string(),
                        Ok(_) => "stopped".to_string(),
                        Err(e) => format!("state unknown ({e})"),
                    };
                    Reading::Sampled(Box::new(sb), state)
                }
                Err(e) => Reading::Unreadable(e.to_string()),
            };
            if tx.send(Sample { guest: i, reading }).is_err() {
                return;
            }
        }
        while Instant::now() < next && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The whole screen's state.
struct App {
    guests: Vec<GuestView>,
    selected: TableState,
    tail: Tail,
    every: Duration,
}

impl App {
    fn new(cfg: &Config, every: Duration) -> App {
        let mut selected = TableState::default();
        selected.select(Some(0));
        App {
            guests: cfg.guests.iter().map(GuestView::new).collect(),
            selected,
            tail: Tail::new(&cfg.events),
            every,
        }
    }

    fn take_events(&mut self) {
        for e in self.tail.lines() {
            let Some(name) = e["guest"].as_str() else {
                continue;
            };
            if let Some(g) = self.guests.iter_mut().find(|g| g.name == name) {
                g.take_event(&e);
            }
        }
    }

    fn step(&mut self, down: bool) {
        let n = self.guests.len();
        if n == 0 {
            return;
        }
        let i = self.selected.selected().unwrap_or(0);
        self.selected
            .select(Some(if down { (i + 1) % n } else { (i + n - 1) % n }));
    }

    fn draw(&mut self, f: &mut Frame) {
        // The chosen guest's sensors as tall as they need; the events take the rest.
        let n_sensors = self
            .selected
            .selected()
            .and_then(|i| self.guests.get(i))
            .map_or(0, |g| g.sensors.len());
        let [head, list, sensors, events, help] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(u16::try_from(self.guests.len().min(8)).unwrap_or(8) + 3),
            Constraint::Length(u16::try_from(n_sensors.clamp(4, 64)).unwrap_or(64) + 3),
            Constraint::Min(6),
            Constraint::Length(1),
        ])
        .areas(f.area());
        f.render_widget(
            Paragraph::new(format!(
                "bdmon top — {} guest(s), sampled every {} ms (read only: FETCH_SB and STATUS)",
                self.guests.len(),
                self.every.as_millis()
            ))
            .style(Style::new().add_modifier(Modifier::BOLD)),
            head,
        );
        let rows = self.guests.iter().map(|g| {
            let (state, style) = match &g.state {
                Shown::Vcpus(s) if !g.bad.is_empty() => (
                    format!("{s}, {} sensor(s) out of contract", g.bad.len()),
                    Style::new().fg(Color::Red),
                ),
                Shown::Vcpus(s) => (format!("{s}, ok"), Style::new().fg(Color::Green)),
                Shown::Unreadable(e) => {
                    (format!("unreachable: {e}"), Style::new().fg(Color::Yellow))
                }
                Shown::NotYet => ("not sampled yet".into(), Style::new()),
            };
            let lock = match g.lock_last_us {
                Some(last) => format!(
                    "{} repair(s), held {:.1} ms (last {:.1} ms)",
                    g.repairs,
                    g.lock_total_us as f64 / 1000.0,
                    last as f64 / 1000.0
                ),
                None => "no repair".into(),
            };
            Row::new(vec![
                Cell::from(g.name.clone()),
                Cell::from(g.bridge.clone()),
                Cell::from(state).style(style),
                Cell::from(lock),
            ])
        });
        let table = Table::new(
            rows,
            [
                Constraint::Length(16),
                Constraint::Length(22),
                Constraint::Min(30),
                Constraint::Length(40),
            ],
        )
        .header(
            Row::new(vec![
                "GUEST",
                "BRIDGE",
                "STATE",
                "LOCK TIME (bdmon's repairs)",
            ])
            .style(Style::new().add_modifier(Modifier::BOLD)),
        )
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .block(Block::default().borders(Borders::ALL).title(" guests "));
        f.render_stateful_widget(table, list, &mut self.selected);

        let Some(g) = self.selected.selected().and_then(|i| self.guests.get(i)) else {
            return;
        };
        let age = g.sampled.map_or("never".into(), |t| {
            format!("{:.1} s ago", t.elapsed().as_secs_f64())
        });
        let rows = g.sensors.iter().map(|s| {
            let ok = !g.bad.contains(&s.id);
            let spark = g
                .history
                .get(&s.id)
                .map(|h| sparkline(h.iter().copied()))
                .unwrap_or_default();
            Row::new(vec![
                Cell::from(s.name.clone()),
                Cell::from(format!("{:?}", s.class).to_lowercase()),
                Cell::from(s.value.to_string()),
                Cell::from(g.checker.describe_threshold(s)),
                Cell::from(if ok { "ok" } else { "BAD" }).style(if ok {
                    Style::new().fg(Color::Green)
                } else {
                    Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
                }),
                Cell::from(spark).style(Style::new().fg(Color::Cyan)),
            ])
        });
        let table = Table::new(
            rows,
            [
                Constraint::Length(22),
                Constraint::Length(9),
                Constraint::Length(14),
                Constraint::Length(10),
                Constraint::Length(5),
                Constraint::Min(10),
            ],
        )
        .header(
            Row::new(vec![
                "SENSOR",
                "CLASS",
                "VALUE",
                "THRESHOLD",
                "STATE",
                "RECENT (progress: increments)",
            ])
            .style(Style::new().add_modifier(Modifier::BOLD)),
        )
        .block(Block::default().borders(Borders::ALL).title(format!(
            " {} — sensors ({} samples, last {age}) ",
            g.name, g.samples
        )));
        f.render_widget(table, sensors);

        let shown = events.height.saturating_sub(2) as usize;
        let lines: Vec<Line> = g
            .events
            .iter()
            .rev()
            .take(shown)
            .rev()
            .map(|l| Line::from(Span::raw(l.clone())))
            .collect();
        let lines = if lines.is_empty() {
            vec![Line::from(
                "(no events for this guest in the event log yet)",
            )]
        } else {
            lines
        };
        f.render_widget(
            Paragraph::new(lines).block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(format!(" {} — last events ", g.name)),
            ),
            events,
        );
        f.render_widget(
            Paragraph::new("q quit   ↑/↓ or j/k choose a guest")
                .style(Style::new().add_modifier(Modifier::DIM)),
            help,
        );
    }
}

/// Runs the view until `q`, Esc or Ctrl-C. The terminal is restored on every way out.
pub fn run(cfg: &Config, every: Duration) -> std::io::Result<()> {
    let (tx, rx): (Sender<Sample>, Receiver<Sample>) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let guests = cfg.guests.clone();
    let sampler = std::thread::spawn(move || sampler(guests, every, tx, s));
    let mut app = App::new(cfg, every);
    let mut terminal = ratatui::init();
    let r = (|| -> std::io::Result<()> {
        loop {
            while let Ok(s) = rx.try_recv() {
                if let Some(g) = app.guests.get_mut(s.guest) {
                    g.take(s.reading);
                }
            }
            app.take_events();
            terminal.draw(|f| app.draw(f))?;
            if event::poll(Duration::from_millis(200))? {
                if let Event::Key(k) = event::read()? {
                    if k.kind != KeyEventKind::Press {
                        continue;
                    }
                    let ctrl_c = k.code == KeyCode::Char('c')
                        && k.modifiers
                            .contains(ratatui::crossterm::event::KeyModifiers::CONTROL);
                    match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        _ if ctrl_c => return Ok(()),
                        KeyCode::Down | KeyCode::Char('j') | KeyCode::Tab => app.step(true),
                        KeyCode::Up | KeyCode::Char('k') | KeyCode::BackTab => app.step(false),
                        _ => {}
                    }
                }
            }
        }
    })();
    ratatui::restore();
    stop.store(true, Ordering::SeqCst);
    // The sampler ends at its next check (a guest read in flight is bounded by the bridge
    // client's timeouts); the process exits after this anyway, so it is not waited for.
    drop(sampler);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparklines_scale_between_min_and_max() {
        assert_eq!(sparkline([0, 7, 14]), "▁▅█");
        assert_eq!(sparkline([5, 5, 5]), "▁▁▁");
        assert_eq!(sparkline(Vec::<u64>::new()), "");
        assert_eq!(sparkline([u64::MAX, 0]), "█▁");
    }

    #[test]
    fn the_event_tail_returns_whole_lines_once_and_restarts_after_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let mut t = Tail::new(p.to_str().unwrap());
        assert!(t.lines().is_empty(), "no file yet");
        std::fs::write(&p, "{\"guest\":\"a\",\"event\":\"x\"}\n{\"guest\":\"a\"").unwrap();
        assert_eq!(t.lines().len(), 1);
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        std::io::Write::write_all(&mut f, b",\"event\":\"y\"}\nnot json\n").unwrap();
        let l = t.lines();
        assert_eq!(l.len(), 1, "the completed line, not the bad one");
        assert_eq!(l[0]["event"], "y");
        assert!(t.lines().is_empty());
        std::fs::write(&p, "{\"guest\":\"b\",\"event\":\"z\"}\n").unwrap();
        assert_eq!(t.lines()[0]["event"], "z");
    }

    #[test]
    fn repairs_add_up_their_lock_time_and_dry_runs_do_not() {
        let cfg = Config::parse(
            "[[guest]]\nname = \"g\"\nbridge = \"127.0.0.1:1\"\npki = \"p\"\nmonitor = \"m\"\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let mut v = GuestView::new(&cfg.guests[0]);
        v.take_event(
            &serde_json::json!({"ts_ms": 3_723_000u64, "guest": "g", "event": "repair",
            "lock_held_us": 1500, "dry_run": false, "hm": "Proc_Repair_Healer"}),
        );
        v.take_event(
            &serde_json::json!({"ts_ms": 3_724_000u64, "guest": "g", "event": "repair",
            "dry_run": true}),
        );
        assert_eq!(
            (v.repairs, v.lock_total_us, v.lock_last_us),
            (1, 1500, Some(1500))
        );
        assert!(v.events[0].starts_with("01:02:03 repair"), "{:?}", v.events);
        assert!(v.events[0].contains("hm=Proc_Repair_Healer"));
    }
}
