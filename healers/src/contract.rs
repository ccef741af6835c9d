//! Sensor contracts, judged from successive samples of one guest's Sensor Box.
//!
//! - **progress**: V must advance within T ms. Judged in host time between samples; a stall is only
//!   a violation once confirmed by the dispatcher with bdvmm's view that the vCPUs ran (a guest we or
//!   another monitor paused is not hung).
//! - **level**: V ≤ T (V ≥ T for `LOWER_BOUND` sensors such as FREE_PAGES).
//! - **pressure**: V counts bad events since boot and must stay ≤ T; a monitor acts on *new* events,
//!   so a pressure sensor is violated when V > T and V grew since the previous sample.
//!
//! Thresholds come from the guest's Sensor Box unless the config overrides them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use introspect::sensorbox::{Sensor, SensorBox, SensorClass, FLAG_LOWER_BOUND};
use serde::Serialize;

/// How a sensor breaks its contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Breach {
    /// A level or pressure value above T.
    Above,
    /// A lower-bound level below T.
    Below,
    /// A progress counter that has not moved for `for_ms`.
    Stalled {
        /// Since when (host time).
        for_ms: u64,
    },
}

/// One violated sensor.
#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    /// Sensor id.
    pub id: u32,
    /// Sensor name.
    pub name: String,
    /// V.
    pub value: u64,
    /// T (after overrides).
    pub threshold: u64,
    /// How.
    pub breach: Breach,
    /// When the sample that showed it was taken.
    #[serde(skip)]
    pub sampled_at: Instant,
}

/// What the checker remembers between samples of one guest.
#[derive(Debug, Default)]
pub struct Checker {
    overrides: HashMap<u32, u64>,
    /// Overrides of sensors known by name only (per device).
    by_name: HashMap<String, u64>,
    boot_id: Option<u64>,
    /// Progress sensors: last value and when it last changed.
    progress: HashMap<u32, (u64, Instant)>,
    /// Pressure sensors: last value.
    pressure: HashMap<u32, u64>,
}

impl Checker {
    /// A checker with threshold overrides by sensor id.
    pub fn new(overrides: HashMap<u32, u64>) -> Checker {
        Checker {
            overrides,
            ..Checker::default()
        }
    }

    /// Also overrides by sensor name (the per-device sensors, whose ids depend on the guest).
    pub fn with_names(mut self, by_name: HashMap<String, u64>) -> Checker {
        self.by_name = by_name;
        self
    }

    /// The threshold in force for `s`.
    pub fn threshold(&self, s: &Sensor) -> u64 {
        if self.overrides.is_empty() && self.by_name.is_empty() {
            return s.threshold;
        }
        self.overrides
            .get(&s.id)
            .or_else(|| self.by_name.get(&s.name))
            .copied()
            .unwrap_or(s.threshold)
    }

    /// The threshold in force for `s`, or `None` where its value means "no threshold": an upper
    /// level or pressure bound of `u64::MAX`, a lower bound of 0, a progress stall time of 0 or
    /// `u64::MAX`.
    pub fn threshold_in_force(&self, s: &Sensor) -> Option<u64> {
        let t = self.threshold(s);
        let none = match s.class {
            SensorClass::Level if s.flags & FLAG_LOWER_BOUND != 0 => t == 0,
            SensorClass::Level | SensorClass::Pressure => t == u64::MAX,
            // 0 and "never" both switch stall detection off.
            SensorClass::Progress => t == 0 || t == u64::MAX,
            SensorClass::Unknown(_) => true,
        };
        (!none).then_some(t)
    }

    /// The threshold in force for `s` as a person reads it: `<= T` or `>= T` for a level,
    /// `> T` (and rising) for pressure, `T ms` (the longest stall) for a progress counter, `-`
    /// for none.
    pub fn describe_threshold(&self, s: &Sensor) -> String {
        match (self.threshold_in_force(s), s.class) {
            (None, _) => "-".into(),
            (Some(t), SensorClass::Level) if s.flags & FLAG_LOWER_BOUND != 0 => format!(">= {t}"),
            (Some(t), SensorClass::Level) => format!("<= {t}"),
            (Some(t), SensorClass::Pressure) => format!("> {t}"),
            (Some(t), _) => format!("{t} ms"),
        }
    }

    /// Forgets progress history (e.g. after the guest was seen paused, or after a repair that held
    /// the lock).
    pub fn reset_progress(&mut self, now: Instant) {
        for (_, since) in self.progress.values_mut() {
            *since = now;
        }
    }

    /// Judges one sample taken at `now`.
    pub fn check(&mut self, sb: &SensorBox, now: Instant) -> Vec<Violation> {
        // A Sensor Box set up but not yet published by the first tick holds zeros (FREE_PAGES
        // 0 would look like a memory crisis). Virtual views (version 0) are always live.
        if sb.header.version >= 1 && sb.header.publishes == 0 {
            return Vec::new();
        }
        if self.boot_id != Some(sb.header.boot_id) {
            // A new boot: start over.
            self.boot_id = Some(sb.header.boot_id);
            self.progress.clear();
            self.pressure.clear();
        }
        let mut out = Vec::new();
        for s in &sb.sensors {
            let t = self.threshold(s);
            let breach = match s.class {
                SensorClass::Progress => {
                    let e = self.progress.entry(s.id).or_insert((s.value, now));
                    if e.0 != s.value {
                        *e = (s.value, now);
                    }
                    let idle = now.saturating_duration_since(e.1);
                    (t > 0 && idle > Duration::from_millis(t)).then_some(Breach::Stalled {
                        for_ms: crate::events::millis(idle),
                    })
                }
                SensorClass::Level if s.flags & FLAG_LOWER_BOUND != 0 => {
                    (s.value < t).then_some(Breach::Below)
                }
                SensorClass::Level => (s.value > t).then_some(Breach::Above),
                SensorClass::Pressure => {
                    let last = self.pressure.insert(s.id, s.value);
                    let grew = last.is_some_and(|l| s.value > l);
                    (s.value > t && grew).then_some(Breach::Above)
                }
                SensorClass::Unknown(_) => None,
            };
            if let Some(breach) = breach {
                out.push(Violation {
                    id: s.id,
                    name: s.name.clone(),
                    value: s.value,
                    threshold: t,
                    breach,
                    sampled_at: now,
                });
            }
        }
        out
    }

    /// True if `s` (from a fresh sample) is within its contract, ignoring progress and pressure
    /// history: what a healer asks to know whether it is done.
    pub fn level_ok(&self, s: &Sensor) -> bool {
        let t = self.threshold(s);
        match s.class {
            SensorClass::Level if s.flags & FLAG_LOWER_BOUND != 0 => s.value >= t,
            SensorClass::Level => s.value <= t,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use introspect::sensorbox::{self, ids, FLAG_VALID};

    fn sb(values: &[(u32, SensorClass, u16, u64, u64)], boot: u64) -> SensorBox {
        let sensors: Vec<Sensor> = values
            .iter()
            .map(|&(id, class, flags, t, v)| Sensor {
                id,
                class,
                flags: flags | FLAG_VALID,
                threshold: t,
                value: v,
                updated: 0,
                name: format!("S{id}"),
            })
            .collect();
        let mut img = sensorbox::encode(&sensors, 250, 2);
        img[0x28..0x30].copy_from_slice(&boot.to_le_bytes());
        sensorbox::parse(&img, 0).unwrap()
    }

    #[test]
    fn thresholds_that_mean_none_are_shown_as_none() {
        let c = Checker::new(HashMap::new());
        let sensor = |class, flags, threshold| Sensor {
            id: 1,
            class,
            flags: flags | FLAG_VALID,
            threshold,
            value: 4_294_893_411,
            updated: 0,
            name: "S".into(),
        };
        let shown = |class, flags, t| c.describe_threshold(&sensor(class, flags, t));
        assert_eq!(shown(SensorClass::Level, 0, u64::MAX), "-");
        assert_eq!(shown(SensorClass::Level, 0, 300), "<= 300");
        assert_eq!(shown(SensorClass::Level, FLAG_LOWER_BOUND, 0), "-");
        assert_eq!(shown(SensorClass::Level, FLAG_LOWER_BOUND, 1024), ">= 1024");
        assert_eq!(shown(SensorClass::Pressure, 0, u64::MAX), "-");
        assert_eq!(shown(SensorClass::Pressure, 0, 0), "> 0");
        assert_eq!(shown(SensorClass::Progress, 0, 0), "-");
        assert_eq!(shown(SensorClass::Progress, 0, u64::MAX), "-");
        assert_eq!(shown(SensorClass::Progress, 0, 1000), "1000 ms");
        assert_eq!(shown(SensorClass::Unknown(9), 0, 5), "-");
        assert_eq!(
            c.threshold_in_force(&sensor(SensorClass::Level, 0, u64::MAX)),
            None
        );
    }

    #[test]
    fn level_pressure_and_progress() {
        let mut c = Checker::new(HashMap::from([(ids::NPROCS, 100)]));
        let t0 = Instant::now();
        let s = |nprocs, free, oom, ticks| {
            sb(
                &[
                    (ids::NPROCS, SensorClass::Level, 0, 4096, nprocs),
                    (
                        ids::FREE_PAGES,
                        SensorClass::Level,
                        FLAG_LOWER_BOUND,
                        1024,
                        free,
                    ),
                    (ids::OOM_KILLER_RUNNING, SensorClass::Pressure, 0, 0, oom),
                    (ids::TIMER_TICKS, SensorClass::Progress, 0, 1000, ticks),
                ],
                7,
            )
        };
        assert!(c.check(&s(50, 5000, 0, 1), t0).is_empty());
        // The override (100) applies, not the box's 4096.
        let v = c.check(&s(150, 500, 0, 2), t0 + Duration::from_millis(10));
        let got: Vec<(u32, Breach)> = v.iter().map(|v| (v.id, v.breach.clone())).collect();
        assert_eq!(
            got,
            vec![
                (ids::NPROCS, Breach::Above),
                (ids::FREE_PAGES, Breach::Below)
            ]
        );
        // Pressure: new events only.
        let v = c.check(&s(50, 5000, 3, 3), t0 + Duration::from_millis(20));
        assert_eq!(v[0].id, ids::OOM_KILLER_RUNNING);
        assert!(c
            .check(&s(50, 5000, 3, 4), t0 + Duration::from_millis(30))
            .is_empty());
        // Progress stalled for more than 1000 ms.
        let v = c.check(&s(50, 5000, 3, 4), t0 + Duration::from_millis(1100));
        assert!(matches!(v[0].breach, Breach::Stalled { for_ms } if for_ms >= 1000));
        c.reset_progress(t0 + Duration::from_millis(1100));
        assert!(c
            .check(&s(50, 5000, 3, 4), t0 + Duration::from_millis(1200))
            .is_empty());
    }

    #[test]
    fn a_per_device_sensor_takes_its_threshold_by_name() {
        // Sensor 34 is named S34 by the helper: an override by that name applies, by id first.
        let c = Checker::new(HashMap::from([(33, 7)])).with_names(HashMap::from([
            ("S34".to_string(), 1500),
            ("S33".into(), 9),
        ]));
        let box_ = sb(
            &[
                (33, SensorClass::Progress, 0, u64::MAX, 1),
                (34, SensorClass::Progress, 0, u64::MAX, 1),
                (35, SensorClass::Progress, 0, u64::MAX, 1),
            ],
            1,
        );
        let t: Vec<u64> = box_.sensors.iter().map(|s| c.threshold(s)).collect();
        assert_eq!(t, [7, 1500, u64::MAX]);
    }
}
