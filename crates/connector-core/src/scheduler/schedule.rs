//! [`SyncSchedule`]: when a connector syncs. An interval or a cron expression, an optional
//! daily window in local wall time, a time zone, and jitter.

use std::fmt;
use std::time::Duration;

use chrono::offset::LocalResult;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::Deserialize;

use crate::error::{Error, Result};

/// How far [`SyncSchedule::next_run`] looks for a cron time inside the window: this many
/// windows (days).
const MAX_WINDOWS_SEARCHED: usize = 1000;
/// How many cron times that fall before the asked instant (the repeated hour of a fall-back
/// day) are stepped over at most.
const MAX_CRON_STEPS: usize = 10_000;

/// A schedule as written in configuration, before validation. Field names are the guide's
/// (`SyncSchedule(interval_hours=1, start_time="08:00", end_time="20:00",
/// timezone="America/New_York")`), plus `jitter_seconds`.
///
/// ```toml
/// [connectors.schedule]
/// interval_minutes = 5         # or interval_seconds, interval_hours, or cron = "0 2 * * *"
/// start_time = "08:00"         # optional window, local wall time; both or neither
/// end_time = "20:00"           # before start_time: the window crosses midnight
/// timezone = "America/New_York" # IANA name; default UTC
/// jitter_seconds = 30          # optional random delay added to each run
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Run every this many seconds.
    #[serde(default)]
    pub interval_seconds: Option<u64>,
    /// Run every this many minutes.
    #[serde(default)]
    pub interval_minutes: Option<u64>,
    /// Run every this many hours.
    #[serde(default)]
    pub interval_hours: Option<u64>,
    /// A 5-field cron expression (minute hour day-of-month month day-of-week), in `timezone`.
    #[serde(default)]
    pub cron: Option<String>,
    /// Start of the daily window (`"08:00"` or `"08:00:00"`), local time in `timezone`.
    #[serde(default)]
    pub start_time: Option<String>,
    /// End of the daily window; before `start_time` means the window crosses midnight.
    #[serde(default)]
    pub end_time: Option<String>,
    /// IANA time zone name (`America/New_York`); default `UTC`.
    #[serde(default)]
    pub timezone: Option<String>,
    /// A random delay of up to this many seconds added to each scheduled run, so that many
    /// connectors on one schedule do not all start in the same second.
    #[serde(default)]
    pub jitter_seconds: Option<u64>,
}

/// When a connector syncs: every `interval`, or at the times of a `cron` expression; only
/// inside a daily window when `start_time`/`end_time` are set; in `timezone`.
///
/// Build one with [`SyncSchedule::every`] or [`SyncSchedule::cron`] and the `with_*` methods,
/// or deserialize a [`ScheduleConfig`] table (serde, `deny_unknown_fields`). Every constructor
/// validates; a `SyncSchedule` is always usable.
///
/// # Rules
/// - **Intervals are real time.** `interval_hours = 1` means 3,600 seconds between due times,
///   whatever the wall clock does on DST days. The next due time is one interval after the
///   previous one ([`next_run`](Self::next_run)); a due time outside the window moves to the
///   window's next opening.
/// - **Cron is wall time** in `timezone`, and each wall time the expression names runs exactly
///   once:
///   - a wall time that does not exist (02:30 on the spring-forward day in New York, when
///     clocks jump from 02:00 to 03:00) runs once, at the jump (03:00 local); several missing
///     times (`*/15`) collapse into that one run;
///   - a wall time that occurs twice (01:30 on the fall-back day) runs once, at its first
///     occurrence (01:30 EDT). An expression like `*/15 * * * *` therefore pauses for the
///     repeated hour; use an interval for a rhythm in real time.
/// - **Windows are wall time.** `start_time = "08:00"`, `end_time = "20:00"` in New York is
///   08:00-20:00 local on every day, winter or summer. A window bound that does not exist on a
///   day means the moment the clock jumps past it; one that occurs twice means its first
///   occurrence (so a window never reopens in the repeated hour). `end_time` before
///   `start_time` is a window across midnight (`22:00`-`06:00`). The window is the half-open
///   interval `[start, end)`.
#[derive(Clone)]
pub struct SyncSchedule {
    kind: Kind,
    window: Option<(NaiveTime, NaiveTime)>,
    timezone: Tz,
    jitter: Duration,
}

#[derive(Clone)]
enum Kind {
    Interval(Duration),
    Cron { expression: String, cron: Box<Cron> },
}

impl fmt::Debug for SyncSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("SyncSchedule");
        match &self.kind {
            Kind::Interval(i) => d.field("interval", i),
            Kind::Cron { expression, .. } => d.field("cron", expression),
        };
        d.field("window", &self.window)
            .field("timezone", &self.timezone)
            .field("jitter", &self.jitter)
            .finish()
    }
}

impl fmt::Display for SyncSchedule {
    /// `every 5m`, `cron "0 2 * * *"`, then the window, zone and jitter when set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Interval(i) => write!(f, "every {}", human(*i))?,
            Kind::Cron { expression, .. } => write!(f, "cron {expression:?}")?,
        }
        if let Some((s, e)) = self.window {
            write!(f, " between {} and {}", s.format("%H:%M"), e.format("%H:%M"))?;
        }
        if self.timezone != Tz::UTC {
            write!(f, " {}", self.timezone.name())?;
        }
        if !self.jitter.is_zero() {
            write!(f, " (jitter {})", human(self.jitter))?;
        }
        Ok(())
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s > 0 && d.subsec_nanos() == 0 {
        if s.is_multiple_of(3600) {
            return format!("{}h", s / 3600);
        }
        if s.is_multiple_of(60) {
            return format!("{}m", s / 60);
        }
        return format!("{s}s");
    }
    format!("{d:?}")
}

impl<'de> Deserialize<'de> for SyncSchedule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let config = ScheduleConfig::deserialize(deserializer)?;
        SyncSchedule::from_config(&config).map_err(serde::de::Error::custom)
    }
}

impl TryFrom<ScheduleConfig> for SyncSchedule {
    type Error = Error;
    fn try_from(config: ScheduleConfig) -> Result<Self> {
        Self::from_config(&config)
    }
}

impl SyncSchedule {
    /// Every `interval` (real time), in UTC, without a window.
    ///
    /// # Errors
    /// A zero interval.
    pub fn every(interval: Duration) -> Result<Self> {
        if interval.is_zero() {
            return Err(Error::config("the schedule's interval must be longer than zero"));
        }
        Ok(Self { kind: Kind::Interval(interval), window: None, timezone: Tz::UTC, jitter: Duration::ZERO })
    }

    /// At the times of a 5-field cron expression (`"0 2 * * *"`: daily at 02:00), in UTC until
    /// [`with_timezone`](Self::with_timezone).
    ///
    /// # Errors
    /// An expression that is not 5 fields, or that cron cannot parse; the message names the
    /// expression and what is wrong.
    pub fn cron(expression: &str) -> Result<Self> {
        let cron = parse_cron(expression)?;
        Ok(Self {
            kind: Kind::Cron { expression: expression.trim().to_owned(), cron: Box::new(cron) },
            window: None,
            timezone: Tz::UTC,
            jitter: Duration::ZERO,
        })
    }

    /// The same schedule in `timezone` (cron times and the window are wall times there).
    pub fn with_timezone(mut self, timezone: Tz) -> Self {
        self.timezone = timezone;
        self
    }

    /// The same schedule in the IANA time zone `name` (`America/New_York`).
    ///
    /// # Errors
    /// An unknown name (named in the message).
    pub fn with_timezone_name(self, name: &str) -> Result<Self> {
        Ok(self.with_timezone(parse_timezone(name)?))
    }

    /// The same schedule, running only between `start` and `end` local time each day
    /// (`end` before `start`: across midnight).
    ///
    /// # Errors
    /// `start == end` (an empty window; leave the window out to run all day).
    pub fn with_window(mut self, start: NaiveTime, end: NaiveTime) -> Result<Self> {
        if start == end {
            return Err(Error::config(format!(
                "start_time and end_time are both {}: the window would be empty (leave both out to run all day)",
                start.format("%H:%M:%S")
            )));
        }
        self.window = Some((start, end));
        Ok(self)
    }

    /// The same schedule with a random delay of up to `jitter` added to each run.
    ///
    /// # Errors
    /// For an interval schedule, a jitter not shorter than the interval.
    pub fn with_jitter(mut self, jitter: Duration) -> Result<Self> {
        if let Kind::Interval(i) = &self.kind
            && jitter >= *i
        {
            return Err(Error::config(format!(
                "jitter_seconds ({}) must be shorter than the interval ({})",
                human(jitter),
                human(*i)
            )));
        }
        self.jitter = jitter;
        Ok(self)
    }

    /// Validates a configuration table.
    ///
    /// # Errors
    /// Not exactly one of `interval_seconds`, `interval_minutes`, `interval_hours` and `cron`; a
    /// zero interval; a bad cron expression; an unknown time zone; a bad or lone
    /// `start_time`/`end_time`; jitter not shorter than the interval. Messages name the key and
    /// the value.
    pub fn from_config(config: &ScheduleConfig) -> Result<Self> {
        let given: Vec<&str> = [
            ("interval_seconds", config.interval_seconds.is_some()),
            ("interval_minutes", config.interval_minutes.is_some()),
            ("interval_hours", config.interval_hours.is_some()),
            ("cron", config.cron.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        let mut schedule = match given.as_slice() {
            [] => {
                return Err(Error::config(
                    "a schedule needs one of interval_seconds, interval_minutes, interval_hours or cron",
                ));
            }
            [_] => {
                let interval = |key: &str, n: u64, unit: u64| -> Result<Duration> {
                    match n.checked_mul(unit) {
                        Some(0) => Err(Error::config(format!("{key} must be at least 1"))),
                        Some(s) => Ok(Duration::from_secs(s)),
                        None => Err(Error::config(format!("{key} = {n} is too large"))),
                    }
                };
                if let Some(n) = config.interval_seconds {
                    Self::every(interval("interval_seconds", n, 1)?)?
                } else if let Some(n) = config.interval_minutes {
                    Self::every(interval("interval_minutes", n, 60)?)?
                } else if let Some(n) = config.interval_hours {
                    Self::every(interval("interval_hours", n, 3600)?)?
                } else {
                    Self::cron(config.cron.as_deref().unwrap_or_default())?
                }
            }
            many => {
                return Err(Error::config(format!(
                    "a schedule takes only one of interval_seconds, interval_minutes, interval_hours and cron, \
                     but has {}",
                    many.join(" and ")
                )));
            }
        };
        if let Some(name) = &config.timezone {
            schedule = schedule.with_timezone(parse_timezone(name)?);
        }
        match (&config.start_time, &config.end_time) {
            (None, None) => {}
            (Some(start), Some(end)) => {
                schedule =
                    schedule.with_window(parse_time("start_time", start)?, parse_time("end_time", end)?)?;
            }
            (Some(_), None) => {
                return Err(Error::config(
                    "start_time needs an end_time (a window has both; leave both out to run all day)",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::config(
                    "end_time needs a start_time (a window has both; leave both out to run all day)",
                ));
            }
        }
        if let Some(j) = config.jitter_seconds {
            schedule = schedule.with_jitter(Duration::from_secs(j))?;
        }
        if let Kind::Cron { expression, .. } = &schedule.kind
            && schedule.window.is_some()
            && schedule.next_run(Utc::now()).is_none()
        {
            return Err(Error::config(format!(
                "cron {expression:?} never falls inside the window {}",
                schedule.window_text()
            )));
        }
        Ok(schedule)
    }

    fn window_text(&self) -> String {
        match self.window {
            Some((s, e)) => format!("{}-{} {}", s.format("%H:%M"), e.format("%H:%M"), self.timezone.name()),
            None => "(none)".into(),
        }
    }

    /// The interval, for an interval schedule.
    pub fn interval(&self) -> Option<Duration> {
        match &self.kind {
            Kind::Interval(i) => Some(*i),
            Kind::Cron { .. } => None,
        }
    }

    /// The cron expression, for a cron schedule.
    pub fn cron_expression(&self) -> Option<&str> {
        match &self.kind {
            Kind::Interval(_) => None,
            Kind::Cron { expression, .. } => Some(expression),
        }
    }

    /// The daily window (start, end), local time.
    pub fn window(&self) -> Option<(NaiveTime, NaiveTime)> {
        self.window
    }

    /// The time zone of cron times and the window.
    pub fn timezone(&self) -> Tz {
        self.timezone
    }

    /// The most random delay added to a run.
    pub fn jitter(&self) -> Duration {
        self.jitter
    }

    /// The first due time strictly after `after`, or `None` when there is none (a cron
    /// expression that never falls inside the window, or past the year 9999).
    ///
    /// Interval: `after + interval`, moved to the next window opening when it falls outside
    /// the window. Cron: the first time of the expression after `after` that lies inside the
    /// window. See the [type docs](Self) for DST.
    pub fn next_run(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.kind {
            Kind::Interval(interval) => {
                let t = after.checked_add_signed(TimeDelta::from_std(*interval).ok()?)?;
                self.next_allowed(t)
            }
            Kind::Cron { cron, .. } => {
                let mut from = after;
                for _ in 0..MAX_WINDOWS_SEARCHED {
                    let t = self.next_cron_time(cron, from)?;
                    if self.is_within_window(t) {
                        return Some(t);
                    }
                    // The first cron time at or after the next opening.
                    from = self.next_window_start(t)? - TimeDelta::nanoseconds(1);
                }
                None
            }
        }
    }

    /// Whether runs may start at `at` (always, without a window).
    pub fn is_within_window(&self, at: DateTime<Utc>) -> bool {
        self.window.is_none() || self.window_containing(at).is_some()
    }

    /// The end of the window that contains `at`; `None` without a window or when `at` is
    /// outside it. A run still going then is stopped at its next checkpoint.
    pub fn window_end(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.window_containing(at).map(|(_, end)| end)
    }

    /// `at` when runs may start then, else the next window opening.
    pub fn next_allowed(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.is_within_window(at) { Some(at) } else { self.next_window_start(at) }
    }

    /// The window (start, end) that contains `at`.
    fn window_containing(&self, at: DateTime<Utc>) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        self.window?;
        let today = at.with_timezone(&self.timezone).date_naive();
        [today.pred_opt()?, today]
            .into_iter()
            .filter_map(|day| self.window_on(day))
            .find(|(start, end)| *start <= at && at < *end)
    }

    /// The first window opening at or after `at`.
    fn next_window_start(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.window?;
        let today = at.with_timezone(&self.timezone).date_naive();
        let mut day = today.pred_opt()?;
        for _ in 0..5 {
            if let Some((start, _)) = self.window_on(day)
                && start >= at
            {
                return Some(start);
            }
            day = day.succ_opt()?;
        }
        None
    }

    /// The window that opens on local date `day`, as instants; `None` when it is empty that day
    /// (both bounds fall in the same DST gap).
    fn window_on(&self, day: NaiveDate) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        let (start, end) = self.window?;
        let end_day = if end > start { day } else { day.succ_opt()? };
        let start = wall_to_instant(self.timezone, day.and_time(start))?;
        let end = wall_to_instant(self.timezone, end_day.and_time(end))?;
        (start < end).then_some((start, end))
    }

    /// The first instant strictly after `from` at which a wall time of `cron` occurs (a missing
    /// wall time occurs at the end of its gap; a repeated one at its first occurrence).
    fn next_cron_time(&self, cron: &Cron, from: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut wall = from.with_timezone(&self.timezone).naive_local();
        for _ in 0..MAX_CRON_STEPS {
            wall = cron.find_next_occurrence(&wall, false).ok()?;
            let at = wall_to_instant(self.timezone, wall)?;
            if at > from {
                return Some(at);
            }
        }
        None
    }
}

/// The first instant at which the wall clock in `tz` reads `wall` or later: the instant itself,
/// the first of two (a repeated wall time), or the end of the gap (a skipped one).
pub(crate) fn wall_to_instant(tz: Tz, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&wall) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => Some(t.with_timezone(&Utc)),
        LocalResult::None => {
            // In a gap: the first wall minute after it that exists is where the gap ends (gaps
            // begin and end on whole minutes in the tz database's modern rules).
            let mut w = wall.with_second(0)?.with_nanosecond(0)?;
            for _ in 0..(26 * 60) {
                w = w.checked_add_signed(TimeDelta::minutes(1))?;
                match tz.from_local_datetime(&w) {
                    LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => {
                        return Some(t.with_timezone(&Utc));
                    }
                    LocalResult::None => {}
                }
            }
            None
        }
    }
}

fn parse_cron(expression: &str) -> Result<Cron> {
    let trimmed = expression.trim();
    if trimmed.is_empty() {
        return Err(Error::config("cron is empty; expected 5 fields like \"0 2 * * *\""));
    }
    let fields = trimmed.split_whitespace().count();
    if !trimmed.starts_with('@') && fields != 5 {
        return Err(Error::config(format!(
            "cron {trimmed:?} has {fields} field{}; expected 5: minute hour day-of-month month day-of-week \
             (like \"0 2 * * *\")",
            if fields == 1 { "" } else { "s" }
        )));
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(trimmed)
        .map_err(|e| Error::config(format!("cron {trimmed:?} is not valid: {e}")))
}

fn parse_timezone(name: &str) -> Result<Tz> {
    name.trim().parse::<Tz>().map_err(|_| {
        Error::config(format!(
            "timezone {name:?} is not a known time zone; use an IANA name like \"America/New_York\" or \"UTC\""
        ))
    })
}

fn parse_time(key: &str, text: &str) -> Result<NaiveTime> {
    let t = text.trim();
    NaiveTime::parse_from_str(t, "%H:%M")
        .or_else(|_| NaiveTime::parse_from_str(t, "%H:%M:%S"))
        .map_err(|_| Error::config(format!("{key} {text:?} is not a time like \"08:00\" (24-hour, HH:MM)")))
}
