//! Cron schedules and backup retention, as pure functions of times in milliseconds since the
//! Unix epoch. Everything is UTC: a target's local time zone never enters, so a schedule fires
//! at the same instants on every machine and daylight saving time cannot skip or repeat a run.
//!
//! There is deliberately no "missed runs" function. A scheduler that wakes late (Hefring was
//! down, the host slept) asks [`Schedule::due`] once and runs the job once, not once per slot it
//! slept through: catching up on twelve missed hourly backups or cron jobs in a burst helps
//! nobody and can hurt the target.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest schedule text accepted. Cron lines are short; the bound keeps error messages, which
/// quote the input, short too.
pub const MAX_SCHEDULE_LEN: usize = 200;

/// A parsed cron schedule: 5 fields (`minute hour day-of-month month day-of-week`), 6 fields
/// (a leading `second`), or one of the macros `@hourly`, `@daily`/`@midnight`, `@weekly`,
/// `@monthly`, `@yearly`/`@annually`.
///
/// Each field takes `*`, numbers, ranges `a-b`, steps `*/n`, `a-b/n` and `a/n` (from `a` to the
/// field's end), and comma-separated lists of these. Months take `jan`..`dec` and days of the
/// week `sun`..`sat`, in any case; day of week 0 and 7 are both Sunday, and `a/n` there ends at
/// Saturday (6) because 7 is only another name for Sunday.
///
/// Day rule, as Vixie cron and cronie implement it and crontab(5) documents it: when both
/// day-of-month and day-of-week are restricted, a day matches if EITHER matches; otherwise both
/// must. A field counts as restricted when its text does not start with `*`, so `*/2` is
/// unrestricted here just as on the hosts' own cron (`0 0 */2 * 5` is odd days that are
/// Fridays, not odd days or Fridays). This keeps `*/1` meaning exactly what `*` means.
///
/// Equality and [`fmt::Display`] use the canonical text: fields separated by one space, names
/// in lower case, `@midnight` spelled `@daily` and `@annually` spelled `@yearly`. Serialised as
/// that string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Schedule {
    text: String,
    // Bit i set means value i matches.
    seconds: u64,
    minutes: u64,
    hours: u64,
    days_of_month: u64,
    months: u64,
    days_of_week: u64,
    days_of_month_restricted: bool,
    days_of_week_restricted: bool,
}

/// What kind of mistake a schedule text has, for callers that react to it; the message in
/// [`ScheduleError`] is what people read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleErrorKind {
    Empty,
    TooLong,
    ControlCharacter,
    FieldCount,
    UnknownMacro,
    /// Something that is not a number, name, range, step or list where one was expected.
    Syntax,
    OutOfRange,
    ZeroStep,
    ReversedRange,
}

/// Why a schedule text was refused. The message names the field (by its 1-based position in the
/// text and its meaning) and the offending part, e.g.
/// `field 2 (hour): 24 is out of range 0-23`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ScheduleError {
    pub kind: ScheduleErrorKind,
    pub message: String,
}

impl ScheduleError {
    fn new(kind: ScheduleErrorKind, message: impl Into<String>) -> Self {
        ScheduleError {
            kind,
            message: message.into(),
        }
    }
}

struct FieldSpec {
    name: &'static str,
    min: u32,
    max: u32,
    /// Where `*` and `a/n` end: below `max` only for day of week, whose 7 is an alias.
    star_max: u32,
    /// Names for values `name_base`, `name_base + 1`, ...
    names: &'static [&'static str],
    name_base: u32,
}

const SECOND: FieldSpec = FieldSpec {
    name: "second",
    min: 0,
    max: 59,
    star_max: 59,
    names: &[],
    name_base: 0,
};
const MINUTE: FieldSpec = FieldSpec {
    name: "minute",
    min: 0,
    max: 59,
    star_max: 59,
    names: &[],
    name_base: 0,
};
const HOUR: FieldSpec = FieldSpec {
    name: "hour",
    min: 0,
    max: 23,
    star_max: 23,
    names: &[],
    name_base: 0,
};
const DAY_OF_MONTH: FieldSpec = FieldSpec {
    name: "day of month",
    min: 1,
    max: 31,
    star_max: 31,
    names: &[],
    name_base: 0,
};
const MONTH: FieldSpec = FieldSpec {
    name: "month",
    min: 1,
    max: 12,
    star_max: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
    name_base: 1,
};
const DAY_OF_WEEK: FieldSpec = FieldSpec {
    name: "day of week",
    min: 0,
    max: 7,
    star_max: 6,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
    name_base: 0,
};

const MACROS: &[(&str, &str, &str)] = &[
    // (as written, canonical, expansion)
    ("@hourly", "@hourly", "0 * * * *"),
    ("@daily", "@daily", "0 0 * * *"),
    ("@midnight", "@daily", "0 0 * * *"),
    ("@weekly", "@weekly", "0 0 * * 0"),
    ("@monthly", "@monthly", "0 0 1 * *"),
    ("@yearly", "@yearly", "0 0 1 1 *"),
    ("@annually", "@yearly", "0 0 1 1 *"),
];

/// Days in each month of a leap year: the most a month can ever have.
const MAX_DAYS_IN_MONTH: [u32; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

/// The Gregorian calendar, weekdays included, repeats every 400 years (146097 days is a whole
/// number of weeks), so a schedule that can match at all matches within this many years.
const SEARCH_YEARS: i64 = 401;

impl Schedule {
    /// Parses a schedule; see [`Schedule`] for the syntax.
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        use ScheduleErrorKind as K;
        // Length and control characters first: later messages quote the input.
        let length = text.chars().count();
        if length > MAX_SCHEDULE_LEN {
            return Err(ScheduleError::new(
                K::TooLong,
                format!(
                    "schedule is {length} characters long; at most {MAX_SCHEDULE_LEN} are allowed"
                ),
            ));
        }
        // Tabs and newlines included: a newline in a schedule is how crontab injection starts.
        if let Some(c) = text.chars().find(|c| c.is_control()) {
            return Err(ScheduleError::new(
                K::ControlCharacter,
                format!(
                    "schedule contains the control character U+{:04X}",
                    u32::from(c)
                ),
            ));
        }
        let fields: Vec<&str> = text.split(' ').filter(|f| !f.is_empty()).collect();
        if fields.is_empty() {
            return Err(ScheduleError::new(K::Empty, "schedule is empty"));
        }
        if fields[0].starts_with('@') {
            let lower = fields[0].to_ascii_lowercase();
            let Some(&(_, canonical, expansion)) = MACROS.iter().find(|m| m.0 == lower) else {
                return Err(ScheduleError::new(
                    K::UnknownMacro,
                    format!(
                        "unknown macro '{}'; expected @hourly, @daily, @midnight, @weekly, \
                         @monthly, @yearly or @annually",
                        fields[0]
                    ),
                ));
            };
            if fields.len() > 1 {
                return Err(ScheduleError::new(
                    K::FieldCount,
                    format!("macro '{}' must stand alone", fields[0]),
                ));
            }
            let mut schedule = Schedule::parse(expansion)?;
            schedule.text = canonical.to_string();
            return Ok(schedule);
        }
        let (specs, with_seconds): (&[&FieldSpec], bool) = match fields.len() {
            5 => (
                &[&MINUTE, &HOUR, &DAY_OF_MONTH, &MONTH, &DAY_OF_WEEK],
                false,
            ),
            6 => (
                &[&SECOND, &MINUTE, &HOUR, &DAY_OF_MONTH, &MONTH, &DAY_OF_WEEK],
                true,
            ),
            n => {
                return Err(ScheduleError::new(
                    K::FieldCount,
                    format!(
                        "schedule has {n} field{}; expected 5 (minute hour day-of-month month \
                         day-of-week) or 6 (a leading second, then those 5)",
                        if n == 1 { "" } else { "s" }
                    ),
                ))
            }
        };
        let mut sets = [0u64; 6];
        for (i, (field, spec)) in fields.iter().zip(specs).enumerate() {
            sets[i] = parse_field(field, spec, i + 1)?;
        }
        let [seconds, minutes, hours, days_of_month, months, days_of_week] = if with_seconds {
            sets
        } else {
            [1, sets[0], sets[1], sets[2], sets[3], sets[4]]
        };
        let offset = usize::from(with_seconds);
        Ok(Schedule {
            text: fields.join(" ").to_ascii_lowercase(),
            seconds,
            minutes,
            hours,
            days_of_month,
            months,
            days_of_week,
            days_of_month_restricted: !fields[offset + 2].starts_with('*'),
            days_of_week_restricted: !fields[offset + 4].starts_with('*'),
        })
    }

    /// Whether it fires at most once in any minute: at one second of it (a five-field
    /// schedule fires at second 0).
    pub fn fires_at_most_once_a_minute(&self) -> bool {
        self.seconds.count_ones() == 1
    }

    /// The canonical text, as [`fmt::Display`] writes it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first matching instant strictly after `after_ms`, at a whole second (at second 0 of a
    /// minute for 5-field schedules and macros).
    ///
    /// `None` when the schedule can never match (`0 0 30 2 *`, `0 0 31 4,6,9,11 *`) or when its
    /// next match lies beyond what `i64` milliseconds can hold. Every other schedule matches
    /// within one 400-year Gregorian cycle, and the search skips whole months, days, hours and
    /// minutes that cannot match, so even a Sunday 29 February is found in a few thousand steps.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        if !self.can_ever_match() {
            return None;
        }
        let mut at = Cursor::from_seconds(after_ms.div_euclid(1000) + 1);
        let last_year = at.year + SEARCH_YEARS;
        loop {
            if at.year > last_year {
                return None;
            }
            if !has(self.months, at.month) {
                match next_in(self.months, at.month) {
                    Some(month) => at.start_of_month(at.year, month),
                    None => at.start_of_month(at.year + 1, self.months.trailing_zeros()),
                }
                continue;
            }
            if !self.day_matches(at.year, at.month, at.day) {
                at.next_day();
                continue;
            }
            match next_in(self.hours, at.hour) {
                None => {
                    at.next_day();
                    continue;
                }
                Some(hour) if hour != at.hour => {
                    at.hour = hour;
                    at.minute = 0;
                    at.second = 0;
                }
                Some(_) => {}
            }
            match next_in(self.minutes, at.minute) {
                None => {
                    at.next_hour();
                    continue;
                }
                Some(minute) if minute != at.minute => {
                    at.minute = minute;
                    at.second = 0;
                }
                Some(_) => {}
            }
            match next_in(self.seconds, at.second) {
                None => {
                    at.next_minute();
                    continue;
                }
                Some(second) => at.second = second,
            }
            return at.to_seconds().checked_mul(1000);
        }
    }

    /// Whether the schedule fires in `(last_ms, now_ms]`: the job last ran (or was considered)
    /// at `last_ms` and the scheduler is looking at `now_ms`. However many slots passed, the
    /// answer is one yes: a late scheduler runs the job once (see the module documentation).
    pub fn due(&self, last_ms: i64, now_ms: i64) -> bool {
        now_ms > last_ms && self.next_after(last_ms).is_some_and(|next| next <= now_ms)
    }

    fn day_matches(&self, year: i64, month: u32, day: u32) -> bool {
        let by_month_day = has(self.days_of_month, day);
        let by_weekday = has(
            self.days_of_week,
            weekday(days_from_civil(year, month, day)),
        );
        if self.days_of_month_restricted && self.days_of_week_restricted {
            by_month_day || by_weekday
        } else {
            by_month_day && by_weekday
        }
    }

    /// False only when the day of month must match and no chosen month ever has a chosen day.
    /// Otherwise some date in a 400-year cycle falls on every weekday, so a match exists.
    fn can_ever_match(&self) -> bool {
        if self.days_of_month_restricted && self.days_of_week_restricted {
            return true;
        }
        (1..=12u32).any(|month| {
            has(self.months, month)
                && (1..=MAX_DAYS_IN_MONTH[month as usize - 1]).any(|d| has(self.days_of_month, d))
        })
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Schedule::parse(text)
    }
}

impl TryFrom<String> for Schedule {
    type Error = ScheduleError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Schedule::parse(&text)
    }
}

impl From<Schedule> for String {
    fn from(schedule: Schedule) -> String {
        schedule.text
    }
}

/// Parses one field into a bit set of its values; `position` is 1-based, for messages.
fn parse_field(text: &str, spec: &FieldSpec, position: usize) -> Result<u64, ScheduleError> {
    use ScheduleErrorKind as K;
    let error = |kind, message: String| {
        ScheduleError::new(kind, format!("field {position} ({}): {message}", spec.name))
    };
    let mut set = 0u64;
    for item in text.split(',') {
        if item.is_empty() {
            return Err(error(
                K::Syntax,
                format!("'{text}' has an empty list element"),
            ));
        }
        let (base, step) = match item.split_once('/') {
            None => (item, None),
            Some((base, step)) => {
                if !is_number(step) {
                    return Err(error(K::Syntax, format!("step '{step}' is not a number")));
                }
                match step.parse::<u32>() {
                    Ok(0) => return Err(error(K::ZeroStep, "a step must be at least 1".into())),
                    Ok(n) => (base, Some(n)),
                    Err(_) => {
                        return Err(error(K::OutOfRange, format!("step {step} is too large")))
                    }
                }
            }
        };
        let value = |text: &str| -> Result<u32, ScheduleError> {
            let v = if is_number(text) {
                // Too many digits for u32 is out of range just like 60 minutes is.
                text.parse::<u32>().unwrap_or(u32::MAX)
            } else if let Some(i) = spec.names.iter().position(|n| n.eq_ignore_ascii_case(text)) {
                spec.name_base + i as u32
            } else if text.is_empty() {
                return Err(error(K::Syntax, format!("'{item}' is missing a value")));
            } else if spec.names.is_empty() {
                return Err(error(K::Syntax, format!("'{text}' is not a number")));
            } else {
                return Err(error(
                    K::Syntax,
                    format!(
                        "'{text}' is not a number or a name ({}-{})",
                        spec.names[0],
                        spec.names[spec.names.len() - 1]
                    ),
                ));
            };
            if v < spec.min || v > spec.max {
                return Err(error(
                    K::OutOfRange,
                    format!("{text} is out of range {}-{}", spec.min, spec.max),
                ));
            }
            Ok(v)
        };
        let (first, last) = if base == "*" {
            (spec.min, spec.star_max)
        } else if let Some((a, b)) = base.split_once('-') {
            let (first, last) = (value(a)?, value(b)?);
            if first > last {
                return Err(error(
                    K::ReversedRange,
                    format!("range '{base}' runs backwards"),
                ));
            }
            (first, last)
        } else {
            let first = value(base)?;
            // `a/n` runs to the field's end; a lone `a` is just itself.
            (
                first,
                if step.is_some() {
                    first.max(spec.star_max)
                } else {
                    first
                },
            )
        };
        let step = step.unwrap_or(1);
        let mut v = first;
        while v <= last {
            set |= 1 << v;
            v = match v.checked_add(step) {
                Some(next) => next,
                None => break,
            };
        }
    }
    // Day of week 7 is Sunday.
    if spec.name == DAY_OF_WEEK.name && has(set, 7) {
        set = (set & !(1 << 7)) | 1;
    }
    Ok(set)
}

fn is_number(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

fn has(set: u64, value: u32) -> bool {
    value < 64 && set & (1 << value) != 0
}

/// The smallest member of `set` that is at least `from`.
fn next_in(set: u64, from: u32) -> Option<u32> {
    if from >= 64 {
        return None;
    }
    let rest = set & (u64::MAX << from);
    (rest != 0).then(|| rest.trailing_zeros())
}

/// A civil UTC date and time that `next_after` moves forward field by field. Moving a field
/// resets the smaller ones, so the cursor never skips a candidate.
struct Cursor {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl Cursor {
    fn from_seconds(seconds: i64) -> Cursor {
        let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
        // In 0..86400, so the casts below cannot truncate.
        let of_day = seconds.rem_euclid(86_400) as u32;
        Cursor {
            year,
            month,
            day,
            hour: of_day / 3600,
            minute: of_day / 60 % 60,
            second: of_day % 60,
        }
    }

    fn to_seconds(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour * 3600 + self.minute * 60 + self.second)
    }

    fn start_of_month(&mut self, year: i64, month: u32) {
        self.year = year;
        self.month = month;
        self.day = 1;
        self.hour = 0;
        self.minute = 0;
        self.second = 0;
    }

    fn next_day(&mut self) {
        if self.day < days_in_month(self.year, self.month) {
            self.day += 1;
            self.hour = 0;
            self.minute = 0;
            self.second = 0;
        } else if self.month < 12 {
            self.start_of_month(self.year, self.month + 1);
        } else {
            self.start_of_month(self.year + 1, 1);
        }
    }

    fn next_hour(&mut self) {
        if self.hour < 23 {
            self.hour += 1;
            self.minute = 0;
            self.second = 0;
        } else {
            self.next_day();
        }
    }

    fn next_minute(&mut self) {
        if self.minute < 59 {
            self.minute += 1;
            self.second = 0;
        } else {
            self.next_hour();
        }
    }
}

fn is_leap_year(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    if month == 2 && !is_leap_year(year) {
        28
    } else {
        MAX_DAYS_IN_MONTH[month as usize - 1]
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`:
/// years start in March so the leap day is the last day of its year).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of [`days_from_civil`]: (year, month 1-12, day 1-31).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // 0 is March
                                                     // Both in range by construction: day 1-31, month 1-12.
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400;
    (if month <= 2 { year + 1 } else { year }, month, day)
}

/// Day of the week, 0 = Sunday, of a day counted from 1970-01-01 (a Thursday).
fn weekday(days: i64) -> u32 {
    (days + 4).rem_euclid(7) as u32
}

/// How many scheduled backups to keep: the newest of each of the last `daily` days and the last
/// `weekly` ISO weeks (Monday to Sunday, UTC) that have backups.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Retention {
    pub daily: u32,
    pub weekly: u32,
}

/// Which backups to keep under `policy`; the caller deletes every other one it passed in.
///
/// `backups` are (id, creation time in ms) of the *scheduled* backups of one environment only:
/// the caller never passes manual backups, so a policy can never delete what a person asked for.
///
/// Semantics, the ones borg and restic users expect from `--keep-daily`/`--keep-weekly`:
/// - Daily: walking from the newest backup back, the newest backup of each distinct UTC calendar
///   day, until `daily` days are kept. Days without backups are not counted: `daily: 7` keeps
///   the last seven days *that have backups*, so an environment whose backups stopped (or had
///   gaps) still keeps seven, reaching further back, rather than having its window run empty.
///   Today counts if it has a backup.
/// - Weekly: the same over ISO weeks (starting Monday, UTC), the current week included.
/// - The result is the union of the two (as restic does): each rule picks on its own, and a
///   backup that is both a daily and a weekly keeper is kept, and listed, once. (borg instead
///   stops counting a backup toward later rules once an earlier rule kept it, which stretches
///   the weekly window by the weeks the dailies cover; "7 daily, 4 weekly" here spans four
///   weeks, as people read it.)
/// - Backups created after `now_ms` (clock skew between hosts) are always kept and take no
///   slot, so a skewed backup cannot push out a real one.
/// - Backups with equal times are ordered by id, the greater one newer, since ids are
///   time-ordered.
///
/// A policy of `daily: 0, weekly: 0` keeps nothing but future backups; refusing such a policy,
/// if wanted, is validation's job.
pub fn retained<'a>(
    backups: &[(&'a str, i64)],
    policy: Retention,
    now_ms: i64,
) -> BTreeSet<&'a str> {
    let mut keep = BTreeSet::new();
    let mut past = Vec::with_capacity(backups.len());
    for &(id, created_ms) in backups {
        if created_ms > now_ms {
            keep.insert(id);
        } else {
            past.push((id, created_ms));
        }
    }
    past.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(a.0)));
    keep_newest_per_period(&past, policy.daily, day_of, &mut keep);
    keep_newest_per_period(&past, policy.weekly, monday_of, &mut keep);
    keep
}

/// Keeps the first backup of each of the first `periods` periods in `newest_first`. Sorted by
/// time, each period's backups are contiguous, so comparing with the previous one is enough.
fn keep_newest_per_period<'a>(
    newest_first: &[(&'a str, i64)],
    periods: u32,
    period_of: fn(i64) -> i64,
    keep: &mut BTreeSet<&'a str>,
) {
    let mut kept = 0;
    let mut previous = None;
    for &(id, created_ms) in newest_first {
        if kept == periods {
            break;
        }
        let period = period_of(created_ms);
        if previous != Some(period) {
            previous = Some(period);
            keep.insert(id);
            kept += 1;
        }
    }
}

fn day_of(ms: i64) -> i64 {
    ms.div_euclid(86_400_000)
}

/// The week as its Monday's day number: one number per ISO week, across year ends too.
fn monday_of(ms: i64) -> i64 {
    let day = day_of(ms);
    day - i64::from((weekday(day) + 6) % 7)
}

/// What a user schedules for one environment (kept in its `settings`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentSchedules {
    /// Overrides the schedule of the manifest's `cron` command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<Schedule>,
    /// Scheduled backups and how many of them to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backups: Option<BackupSchedule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSchedule {
    pub schedule: Schedule,
    pub keep_daily: u32,
    pub keep_weekly: u32,
}

impl BackupSchedule {
    pub fn retention(&self) -> Retention {
        Retention {
            daily: self.keep_daily,
            weekly: self.keep_weekly,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `YYYY-MM-DDTHH:MM:SS[.mmm]Z` to milliseconds.
    fn ms(iso: &str) -> i64 {
        let n = |range: std::ops::Range<usize>| iso[range].parse::<i64>().unwrap();
        assert!(
            iso.ends_with('Z') && (iso.len() == 20 || iso.len() == 24),
            "{iso}"
        );
        let days = days_from_civil(n(0..4), n(5..7) as u32, n(8..10) as u32);
        let millis = if iso.len() == 24 { n(20..23) } else { 0 };
        ((days * 24 + n(11..13)) * 60 + n(14..16)) * 60_000 + n(17..19) * 1000 + millis
    }

    /// Milliseconds to `YYYY-MM-DDTHH:MM:SSZ` (with `.mmm` when not whole), so failures read as
    /// dates.
    fn iso(ms: i64) -> String {
        let (y, mo, d) = civil_from_days(ms.div_euclid(86_400_000));
        let of_day = ms.rem_euclid(86_400_000);
        let (h, mi, s, milli) = (
            of_day / 3_600_000,
            of_day / 60_000 % 60,
            of_day / 1000 % 60,
            of_day % 1000,
        );
        if milli == 0 {
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
        } else {
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
        }
    }

    /// The next fire time of `schedule` after `after`, as text ("none" for `None`).
    fn next(schedule: &str, after: &str) -> String {
        let parsed = Schedule::parse(schedule).unwrap_or_else(|e| panic!("{schedule}: {e}"));
        parsed
            .next_after(ms(after))
            .map_or_else(|| "none".to_string(), iso)
    }

    /// Each case: schedule, after, expected next fire time; all hand-checked against a calendar.
    fn check(cases: &[(&str, &str, &str)]) {
        for &(schedule, after, expected) in cases {
            assert_eq!(next(schedule, after), expected, "{schedule} after {after}");
        }
    }

    fn error(text: &str) -> ScheduleError {
        Schedule::parse(text).expect_err(text)
    }

    #[test]
    fn civil_dates_agree_with_known_day_numbers() {
        for (y, m, d, days) in [
            (1970, 1, 1, 0),
            (1969, 12, 31, -1),
            (2000, 1, 1, 10_957),
            (2000, 3, 1, 11_017),
            (2025, 1, 1, 20_089),
            (1900, 3, 1, -25_508),
        ] {
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
            assert_eq!(civil_from_days(days), (y, m, d));
        }
        assert_eq!(weekday(0), 4, "1970-01-01 was a Thursday");
        assert_eq!(
            iso(ms("2025-03-10T10:07:00.250Z")),
            "2025-03-10T10:07:00.250Z"
        );
    }

    #[test]
    fn steps_and_fields() {
        check(&[
            (
                "*/15 * * * *",
                "2025-03-10T10:07:00Z",
                "2025-03-10T10:15:00Z",
            ),
            (
                "*/15 * * * *",
                "2025-03-10T10:14:59.999Z",
                "2025-03-10T10:15:00Z",
            ),
            // Strictly after: a fire time equal to `after` is not next.
            (
                "*/15 * * * *",
                "2025-03-10T10:15:00Z",
                "2025-03-10T10:30:00Z",
            ),
            (
                "*/15 * * * *",
                "2025-03-10T23:50:00Z",
                "2025-03-11T00:00:00Z",
            ),
            ("* * * * *", "2025-03-10T10:07:30Z", "2025-03-10T10:08:00Z"),
            (
                "5/20 * * * *",
                "2025-03-10T10:06:00Z",
                "2025-03-10T10:25:00Z",
            ),
            (
                "5/20 * * * *",
                "2025-03-10T10:45:00Z",
                "2025-03-10T11:05:00Z",
            ),
            (
                "10-30/10 * * * *",
                "2025-03-10T10:31:00Z",
                "2025-03-10T11:10:00Z",
            ),
            (
                "0,30 9-17 * * *",
                "2025-03-10T17:30:00Z",
                "2025-03-11T09:00:00Z",
            ),
            (
                "0 */6 * * *",
                "2025-03-10T13:00:00Z",
                "2025-03-10T18:00:00Z",
            ),
            ("0 0 1 * *", "2025-01-31T00:00:00Z", "2025-02-01T00:00:00Z"),
            // No 31 February, April or June: straight on to 31 March, then 31 May.
            ("0 0 31 * *", "2025-01-31T00:00:00Z", "2025-03-31T00:00:00Z"),
            ("0 0 31 * *", "2025-03-31T00:00:00Z", "2025-05-31T00:00:00Z"),
        ]);
    }

    #[test]
    fn weekdays_across_month_and_year_ends() {
        check(&[
            // 2025-03-28 is a Friday; 31 March and 7 April are Mondays.
            ("0 3 * * 1", "2025-03-28T12:00:00Z", "2025-03-31T03:00:00Z"),
            ("0 3 * * 1", "2025-03-31T03:00:00Z", "2025-04-07T03:00:00Z"),
            (
                "0 3 * * mon",
                "2025-03-31T02:59:59Z",
                "2025-03-31T03:00:00Z",
            ),
            // 2025-12-29 and 2026-01-05 are Mondays.
            ("0 3 * * 1", "2025-12-29T03:00:00Z", "2026-01-05T03:00:00Z"),
            (
                "0 3 * * MON-FRI",
                "2025-05-09T04:00:00Z",
                "2025-05-12T03:00:00Z",
            ),
            // 0 and 7 are both Sunday; 2025-05-11 is one.
            ("0 0 * * 0", "2025-05-10T00:00:00Z", "2025-05-11T00:00:00Z"),
            ("0 0 * * 7", "2025-05-10T00:00:00Z", "2025-05-11T00:00:00Z"),
            (
                "0 0 * * sun",
                "2025-05-10T00:00:00Z",
                "2025-05-11T00:00:00Z",
            ),
            (
                "0 0 * * 5-7",
                "2025-05-11T00:00:00Z",
                "2025-05-16T00:00:00Z",
            ),
            // `a/n` ends at Saturday: Monday, Wednesday, Friday.
            (
                "0 0 * * 1/2",
                "2025-05-16T00:00:00Z",
                "2025-05-19T00:00:00Z",
            ),
        ]);
    }

    #[test]
    fn year_end_rollover() {
        check(&[
            ("0 0 * * *", "2025-12-31T00:00:00Z", "2026-01-01T00:00:00Z"),
            (
                "59 23 31 12 *",
                "2025-12-31T23:59:00Z",
                "2026-12-31T23:59:00Z",
            ),
            ("@yearly", "2025-12-31T23:59:59Z", "2026-01-01T00:00:00Z"),
            ("@annually", "2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
            (
                "0 0 1 jan,jul *",
                "2025-07-01T00:00:00Z",
                "2026-01-01T00:00:00Z",
            ),
            (
                "0 0 1 Jan-Mar/2 *",
                "2025-01-01T00:00:00Z",
                "2025-03-01T00:00:00Z",
            ),
            (
                "* * * * * *",
                "2025-12-31T23:59:59.500Z",
                "2026-01-01T00:00:00Z",
            ),
        ]);
    }

    #[test]
    fn leap_days() {
        check(&[
            ("0 0 29 2 *", "2025-01-01T00:00:00Z", "2028-02-29T00:00:00Z"),
            ("0 0 29 2 *", "2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"),
            // 2100 is not a leap year.
            ("0 0 29 2 *", "2096-03-01T00:00:00Z", "2104-02-29T00:00:00Z"),
            (
                "0 0 29 feb *",
                "2000-01-01T00:00:00Z",
                "2000-02-29T00:00:00Z",
            ),
            // A 29 February that is a Sunday (`*/7` keeps the day rule an AND): 2032, then 2060.
            (
                "0 0 29 2 */7",
                "2025-01-01T00:00:00Z",
                "2032-02-29T00:00:00Z",
            ),
            (
                "0 0 29 2 */7",
                "2032-02-29T00:00:00Z",
                "2060-02-29T00:00:00Z",
            ),
        ]);
    }

    #[test]
    fn impossible_dates_never_match() {
        check(&[
            ("0 0 30 2 *", "2025-01-01T00:00:00Z", "none"),
            ("0 0 31 4,6,9,11 *", "2025-01-01T00:00:00Z", "none"),
            ("0 0 30-31 feb */2", "2025-01-01T00:00:00Z", "none"),
            // Both days restricted: Mondays in February still match.
            (
                "0 0 30 2 mon",
                "2025-01-01T00:00:00Z",
                "2025-02-03T00:00:00Z",
            ),
        ]);
    }

    #[test]
    fn day_of_month_or_day_of_week() {
        check(&[
            // 13th or Friday. May 2025: the 13th is a Tuesday, Fridays are the 2nd, 9th, 16th.
            (
                "0 12 13 * 5",
                "2025-05-10T00:00:00Z",
                "2025-05-13T12:00:00Z",
            ),
            (
                "0 12 13 * 5",
                "2025-05-13T12:00:00Z",
                "2025-05-16T12:00:00Z",
            ),
            (
                "0 12 13 * fri",
                "2025-05-02T12:00:00Z",
                "2025-05-09T12:00:00Z",
            ),
            // One side `*`: both must match, and `*` matches everything.
            ("0 12 * * 5", "2025-05-10T00:00:00Z", "2025-05-16T12:00:00Z"),
            (
                "0 12 13 * *",
                "2025-05-14T00:00:00Z",
                "2025-06-13T12:00:00Z",
            ),
            // A field starting with `*` is unrestricted, as in Vixie cron and cronie: odd days
            // that are Fridays (9th, 23rd), not odd days or Fridays (which would be the 11th).
            (
                "0 12 */2 * 5",
                "2025-05-10T00:00:00Z",
                "2025-05-23T12:00:00Z",
            ),
            (
                "0 12 13 * */1",
                "2025-05-10T00:00:00Z",
                "2025-05-13T12:00:00Z",
            ),
        ]);
    }

    #[test]
    fn seconds_field() {
        check(&[
            (
                "*/10 * * * * *",
                "2025-03-10T10:00:07Z",
                "2025-03-10T10:00:10Z",
            ),
            (
                "*/10 * * * * *",
                "2025-03-10T10:00:55Z",
                "2025-03-10T10:01:00Z",
            ),
            (
                "*/10 * * * * *",
                "2025-03-10T10:00:10Z",
                "2025-03-10T10:00:20Z",
            ),
            (
                "30 0 3 * * 1",
                "2025-03-31T03:00:30Z",
                "2025-04-07T03:00:30Z",
            ),
            // Rolling a minute, hour and day over from their last values.
            (
                "0 * * * * *",
                "2025-03-10T10:58:30Z",
                "2025-03-10T10:59:00Z",
            ),
            (
                "*/10 * * * * *",
                "2025-03-10T23:59:55Z",
                "2025-03-11T00:00:00Z",
            ),
            (
                "0,30 * * * *",
                "2025-03-10T22:45:00Z",
                "2025-03-10T23:00:00Z",
            ),
            (
                "15,45 * * * * *",
                "2025-03-10T23:59:45Z",
                "2025-03-11T00:00:15Z",
            ),
        ]);
    }

    #[test]
    fn macros() {
        check(&[
            ("@hourly", "2025-03-10T10:00:00Z", "2025-03-10T11:00:00Z"),
            ("@daily", "2025-03-10T10:00:00Z", "2025-03-11T00:00:00Z"),
            ("@midnight", "2025-03-10T00:00:00Z", "2025-03-11T00:00:00Z"),
            // 2025-05-10 is a Saturday.
            ("@weekly", "2025-05-10T00:00:00Z", "2025-05-11T00:00:00Z"),
            ("@WEEKLY", "2025-05-11T00:00:00Z", "2025-05-18T00:00:00Z"),
            ("@monthly", "2025-12-15T00:00:00Z", "2026-01-01T00:00:00Z"),
        ]);
    }

    #[test]
    fn before_the_epoch_and_at_the_ends_of_time() {
        check(&[
            ("0 0 1 1 *", "1969-12-31T12:00:00Z", "1970-01-01T00:00:00Z"),
            ("0 0 1 1 *", "1900-06-01T00:00:00Z", "1901-01-01T00:00:00Z"),
            (
                "*/15 * * * *",
                "1969-12-31T23:59:59.999Z",
                "1970-01-01T00:00:00Z",
            ),
            ("0 0 * * 1", "1969-12-31T00:00:00Z", "1970-01-05T00:00:00Z"),
        ]);
        let every_second = Schedule::parse("* * * * * *").unwrap();
        assert_eq!(every_second.next_after(-1), Some(0));
        assert_eq!(every_second.next_after(-1001), Some(-1000));
        let last_whole_second = i64::MAX / 1000 * 1000;
        assert_eq!(
            every_second.next_after(i64::MAX - 1000),
            Some(last_whole_second)
        );
        assert_eq!(every_second.next_after(last_whole_second), None);
        assert_eq!(every_second.next_after(i64::MAX), None);
        assert!(every_second.next_after(i64::MIN).is_some());
        // i64::MAX milliseconds is 292278994-08-17T07:12:55.807Z.
        let yearly = Schedule::parse("@yearly").unwrap();
        let days = 86_400_000;
        assert_eq!(
            yearly.next_after(i64::MAX - 366 * days).map(iso),
            Some("292278994-01-01T00:00:00Z".to_string())
        );
        assert_eq!(yearly.next_after(i64::MAX - 100 * days), None);
    }

    #[test]
    fn due_runs_once_however_late() {
        let s = Schedule::parse("0 3 * * *").unwrap();
        let last = ms("2025-03-10T03:00:00Z");
        assert!(!s.due(last, ms("2025-03-11T02:59:59.999Z")));
        assert!(s.due(last, ms("2025-03-11T03:00:00Z")));
        // Days late is still one yes, not one per missed day.
        assert!(s.due(last, ms("2025-03-15T12:00:00Z")));
        assert!(!s.due(last, last));
        assert!(!s.due(last, last - 1));
        assert!(!Schedule::parse("0 0 30 2 *").unwrap().due(0, i64::MAX));
    }

    #[test]
    fn canonical_text_and_serde() {
        for (text, canonical) in [
            ("*/15 * * * *", "*/15 * * * *"),
            ("  0   3  * *   MON  ", "0 3 * * mon"),
            ("0 0 1 JAN,Jul *", "0 0 1 jan,jul *"),
            ("@midnight", "@daily"),
            ("@Annually", "@yearly"),
            ("@HOURLY", "@hourly"),
            ("*/10 * * * * *", "*/10 * * * * *"),
        ] {
            let s = Schedule::parse(text).unwrap();
            assert_eq!(s.to_string(), canonical);
            assert_eq!(s.as_str(), canonical);
            assert_eq!(Schedule::parse(canonical).unwrap(), s);
            assert_eq!(text.parse::<Schedule>().unwrap(), s);
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{canonical}\""));
            assert_eq!(serde_json::from_str::<Schedule>(&json).unwrap(), s);
        }
        let bad = serde_json::from_str::<Schedule>("\"0 24 * * *\"").unwrap_err();
        assert!(
            bad.to_string()
                .contains("field 2 (hour): 24 is out of range 0-23"),
            "{bad}"
        );
        // Macros and their expansions fire alike, but keep their own text.
        let daily = Schedule::parse("@daily").unwrap();
        let expanded = Schedule::parse("0 0 * * *").unwrap();
        assert_ne!(daily, expanded);
        assert_eq!(daily.next_after(0), expanded.next_after(0));
    }

    #[test]
    fn errors_name_what_is_wrong() {
        use ScheduleErrorKind as K;
        for (text, kind, message) in [
            ("", K::Empty, "schedule is empty"),
            ("   ", K::Empty, "schedule is empty"),
            (
                "0 0 * *",
                K::FieldCount,
                "schedule has 4 fields; expected 5 (minute hour day-of-month month \
                 day-of-week) or 6 (a leading second, then those 5)",
            ),
            (
                "0 0 0 * * * *",
                K::FieldCount,
                "schedule has 7 fields; expected 5",
            ),
            ("daily", K::FieldCount, "schedule has 1 field; expected 5"),
            ("@reboot", K::UnknownMacro, "unknown macro '@reboot'"),
            ("@daily 0", K::FieldCount, "macro '@daily' must stand alone"),
            (
                "0 0 * * *\n",
                K::ControlCharacter,
                "control character U+000A",
            ),
            (
                "0\t0 * * *",
                K::ControlCharacter,
                "control character U+0009",
            ),
            (
                "0 0 * * *\u{7f}",
                K::ControlCharacter,
                "control character U+007F",
            ),
            (
                "0 24 * * *",
                K::OutOfRange,
                "field 2 (hour): 24 is out of range 0-23",
            ),
            (
                "60 * * * *",
                K::OutOfRange,
                "field 1 (minute): 60 is out of range 0-59",
            ),
            (
                "0 0 0 * *",
                K::OutOfRange,
                "field 3 (day of month): 0 is out of range 1-31",
            ),
            (
                "0 0 * 13 *",
                K::OutOfRange,
                "field 4 (month): 13 is out of range 1-12",
            ),
            (
                "0 0 * * 8",
                K::OutOfRange,
                "field 5 (day of week): 8 is out of range 0-7",
            ),
            (
                "60 0 0 * * *",
                K::OutOfRange,
                "field 1 (second): 60 is out of range 0-59",
            ),
            (
                "0 60 0 * * *",
                K::OutOfRange,
                "field 2 (minute): 60 is out of range 0-59",
            ),
            (
                "0 0 24 * * *",
                K::OutOfRange,
                "field 3 (hour): 24 is out of range 0-23",
            ),
            (
                "99999999999 * * * *",
                K::OutOfRange,
                "99999999999 is out of range 0-59",
            ),
            (
                "*/99999999999 * * * *",
                K::OutOfRange,
                "step 99999999999 is too large",
            ),
            (
                "*/0 * * * *",
                K::ZeroStep,
                "field 1 (minute): a step must be at least 1",
            ),
            (
                "0 1-5/0 * * *",
                K::ZeroStep,
                "field 2 (hour): a step must be at least 1",
            ),
            (
                "30-10 * * * *",
                K::ReversedRange,
                "field 1 (minute): range '30-10' runs backwards",
            ),
            (
                "0 0 * * fri-mon",
                K::ReversedRange,
                "range 'fri-mon' runs backwards",
            ),
            (
                "0 0 * * mon-",
                K::Syntax,
                "field 5 (day of week): 'mon-' is missing a value",
            ),
            ("-5 * * * *", K::Syntax, "'-5' is missing a value"),
            (
                "1,,2 * * * *",
                K::Syntax,
                "'1,,2' has an empty list element",
            ),
            ("1, * * * *", K::Syntax, "has an empty list element"),
            ("*/x * * * *", K::Syntax, "step 'x' is not a number"),
            ("*/ * * * *", K::Syntax, "step '' is not a number"),
            ("1/2/3 * * * *", K::Syntax, "step '2/3' is not a number"),
            (
                "x * * * *",
                K::Syntax,
                "field 1 (minute): 'x' is not a number",
            ),
            (
                "0 0 * * 1-2-3",
                K::Syntax,
                "'2-3' is not a number or a name (sun-sat)",
            ),
            (
                "jan 0 * * *",
                K::Syntax,
                "field 1 (minute): 'jan' is not a number",
            ),
            (
                "0 0 * mon *",
                K::Syntax,
                "'mon' is not a number or a name (jan-dec)",
            ),
            (
                "0 0 * * monday",
                K::Syntax,
                "'monday' is not a number or a name (sun-sat)",
            ),
            ("0 0 * * ?", K::Syntax, "'?' is not a number"),
            ("*-5 * * * *", K::Syntax, "'*' is not a number"),
            ("+5 * * * *", K::Syntax, "'+5' is not a number"),
            ("٣ * * * *", K::Syntax, "'٣' is not a number"),
        ] {
            let e = error(text);
            assert_eq!(e.kind, kind, "{text:?}: {e}");
            assert!(e.message.contains(message), "{text:?}: {e}");
            assert_eq!(e.to_string(), e.message);
        }
        let long = format!("0 0 * * {}", "1,".repeat(100) + "1");
        assert_eq!(error(&long).kind, K::TooLong);
        assert_eq!(
            error(&long).to_string(),
            "schedule is 209 characters long; at most 200 are allowed"
        );
        let longest = format!("{}0 0 * * *", " ".repeat(MAX_SCHEDULE_LEN - 9));
        assert!(Schedule::parse(&longest).is_ok());
        // Errors are ordinary errors, for `?` into whatever the caller returns.
        let _: &dyn std::error::Error = &error("");
    }

    // Property tests. Schedules are generated together with the sets of values they mean,
    // computed from the generator's structure rather than by the parser, and the checker walks
    // the calendar one day at a time by itself, so neither depends on the code under test.

    #[derive(Clone, Debug)]
    struct Field {
        text: String,
        values: u64,
    }

    fn field(
        min: u32,
        star_max: u32,
        names: &'static [&'static str],
        base: u32,
    ) -> BoxedStrategy<Field> {
        let spell = move |v: u32, named: bool| -> String {
            if named && !names.is_empty() && v >= base && v - base < names.len() as u32 {
                let name = names[(v - base) as usize];
                if v & 1 == 0 {
                    name.to_uppercase()
                } else {
                    name.to_string()
                }
            } else {
                v.to_string()
            }
        };
        let set = |values: &[u32]| values.iter().fold(0u64, |s, &v| s | 1 << v);
        let item = prop_oneof![
            Just(("*".to_string(), set(&(min..=star_max).collect::<Vec<_>>()))),
            (1..=star_max + 1).prop_map(move |n| (
                format!("*/{n}"),
                set(&(min..=star_max).step_by(n as usize).collect::<Vec<_>>())
            )),
            (min..=star_max, any::<bool>())
                .prop_map(move |(v, named)| (spell(v, named), set(&[v]))),
            (min..=star_max, min..=star_max, any::<bool>()).prop_map(move |(a, b, named)| {
                let (a, b) = (a.min(b), a.max(b));
                (
                    format!("{}-{}", spell(a, named), spell(b, named)),
                    set(&(a..=b).collect::<Vec<_>>()),
                )
            }),
            (min..=star_max, min..=star_max, 1..=star_max).prop_map(move |(a, b, n)| {
                let (a, b) = (a.min(b), a.max(b));
                (
                    format!("{a}-{b}/{n}"),
                    set(&(a..=b).step_by(n as usize).collect::<Vec<_>>()),
                )
            }),
            (min..=star_max, 1..=star_max).prop_map(move |(a, n)| (
                format!("{a}/{n}"),
                set(&(a..=star_max).step_by(n as usize).collect::<Vec<_>>())
            )),
        ];
        proptest::collection::vec(item, 1..=3)
            .prop_map(|items| Field {
                text: items
                    .iter()
                    .map(|i| i.0.clone())
                    .collect::<Vec<_>>()
                    .join(","),
                values: items.iter().fold(0, |s, i| s | i.1),
            })
            .boxed()
    }

    /// Day of week may also say 7 for Sunday.
    fn day_of_week_field() -> BoxedStrategy<Field> {
        prop_oneof![
            4 => field(0, 6, DAY_OF_WEEK.names, 0),
            1 => Just(Field { text: "7".into(), values: 1 }),
            1 => Just(Field { text: "5-7".into(), values: 1 | 1 << 5 | 1 << 6 }),
        ]
        .boxed()
    }

    #[derive(Clone, Debug)]
    struct Generated {
        text: String,
        with_seconds: bool,
        /// second, minute, hour, day of month, month, day of week
        sets: [u64; 6],
        either_day: bool,
    }

    fn schedule() -> impl Strategy<Value = Generated> {
        (
            proptest::option::of(field(0, 59, &[], 0)),
            field(0, 59, &[], 0),
            field(0, 23, &[], 0),
            field(1, 31, &[], 0),
            field(1, 12, MONTH.names, 1),
            day_of_week_field(),
        )
            .prop_map(|(second, minute, hour, dom, month, dow)| {
                let either_day = !dom.text.starts_with('*') && !dow.text.starts_with('*');
                let fields = [&minute, &hour, &dom, &month, &dow].map(|f| f.text.clone());
                let text = match &second {
                    Some(s) => format!("{} {}", s.text, fields.join(" ")),
                    None => fields.join(" "),
                };
                Generated {
                    text,
                    with_seconds: second.is_some(),
                    sets: [
                        second.map_or(1, |s| s.values),
                        minute.values,
                        hour.values,
                        dom.values,
                        month.values,
                        dow.values,
                    ],
                    either_day,
                }
            })
    }

    /// A calendar day walked forward by itself, independent of `civil_from_days`.
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Day {
        year: i64,
        month: u32,
        day: u32,
        weekday: u32,
    }

    impl Day {
        fn of(ms: i64) -> Day {
            // Walk from 1970-01-01 (a Thursday) a year, then a month at a time.
            let mut days = ms.div_euclid(86_400_000);
            let weekday = (days.rem_euclid(7) as u32 + 4) % 7;
            let year_len = |y: i64| if is_leap_year(y) { 366 } else { 365 };
            let mut year = 1970;
            while days < 0 {
                year -= 1;
                days += year_len(year);
            }
            while days >= year_len(year) {
                days -= year_len(year);
                year += 1;
            }
            let mut month = 1;
            while days >= i64::from(days_in_month(year, month)) {
                days -= i64::from(days_in_month(year, month));
                month += 1;
            }
            Day {
                year,
                month,
                day: days as u32 + 1,
                weekday,
            }
        }

        fn next(self) -> Day {
            let weekday = (self.weekday + 1) % 7;
            if self.day < days_in_month(self.year, self.month) {
                Day {
                    day: self.day + 1,
                    weekday,
                    ..self
                }
            } else if self.month < 12 {
                Day {
                    month: self.month + 1,
                    day: 1,
                    weekday,
                    ..self
                }
            } else {
                Day {
                    year: self.year + 1,
                    month: 1,
                    day: 1,
                    weekday,
                }
            }
        }
    }

    fn day_matches(g: &Generated, d: Day) -> bool {
        let [_, _, _, dom, month, dow] = g.sets;
        let by_dom = dom & 1 << d.day != 0;
        let by_dow = dow & 1 << d.weekday != 0;
        month & 1 << d.month != 0
            && if g.either_day {
                by_dom || by_dow
            } else {
                by_dom && by_dow
            }
    }

    fn time_matches(g: &Generated, second_of_day: i64) -> bool {
        let [s, m, h, ..] = g.sets;
        let (hour, minute, second) = (
            second_of_day / 3600,
            second_of_day / 60 % 60,
            second_of_day % 60,
        );
        h & 1 << hour != 0 && m & 1 << minute != 0 && s & 1 << second != 0
    }

    fn matches(g: &Generated, ms: i64) -> bool {
        ms.rem_euclid(1000) == 0
            && day_matches(g, Day::of(ms))
            && time_matches(g, ms.rem_euclid(86_400_000) / 1000)
    }

    /// No whole second strictly after `from_ms` and strictly before `to_ms`, within the day of
    /// `to_ms - 1`, matches. Only the seconds of matching minutes are looked at one by one.
    fn assert_no_match_between(g: &Generated, from_ms: i64, to_ms: i64) {
        let day_start = (to_ms - 1).div_euclid(86_400_000) * 86_400_000;
        if !day_matches(g, Day::of(day_start)) {
            return;
        }
        let first = (from_ms.div_euclid(1000) + 1 - day_start / 1000).max(0);
        let last = (to_ms - 1).div_euclid(1000) - day_start / 1000;
        let [_, m, h, ..] = g.sets;
        let mut second = first;
        while second <= last {
            let minute_start = second - second % 60;
            if h & 1 << (minute_start / 3600) == 0 || m & 1 << (minute_start / 60 % 60) == 0 {
                second = minute_start + 60;
                continue;
            }
            assert!(
                !time_matches(g, second),
                "{} matches {} between {} and {}",
                g.text,
                iso(day_start + second * 1000),
                iso(from_ms),
                iso(to_ms)
            );
            second += 1;
        }
    }

    /// Instants from 1900 to 2300: half uniform, half built from parts that lean towards the
    /// ends of minutes, hours, days, months and years, where rollovers go wrong.
    fn instant() -> impl Strategy<Value = i64> {
        let built = (
            1900i64..2300,
            prop_oneof![1..=12u32, Just(2), Just(12)],
            prop_oneof![1..=31u32, 27..=31u32],
            prop_oneof![0..24i64, Just(23)],
            prop_oneof![0..60i64, 57..60i64],
            prop_oneof![0..60i64, 57..60i64],
            prop_oneof![0..1000i64, Just(0), Just(999)],
        )
            .prop_map(|(year, month, day, hour, minute, second, milli)| {
                let day = day.min(days_in_month(year, month));
                let days = days_from_civil(year, month, day);
                ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + milli
            });
        prop_oneof![-2_208_988_800_000i64..10_413_792_000_000, built]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn next_after_is_the_first_match_after(
            g in schedule(),
            after in instant(),
        ) {
            let s = Schedule::parse(&g.text).unwrap();
            prop_assert_eq!(
                [s.seconds, s.minutes, s.hours, s.days_of_month, s.months, s.days_of_week],
                g.sets,
                "{}", g.text
            );
            prop_assert_eq!(Schedule::parse(&s.to_string()).unwrap(), s.clone());
            let Some(next) = s.next_after(after) else {
                // Only right for a day of month that no chosen month ever has.
                let [_, _, _, dom, month, _] = g.sets;
                let possible = (1..=12u32).any(|m| {
                    month & 1 << m != 0 && (1..=MAX_DAYS_IN_MONTH[m as usize - 1]).any(|d| dom & 1 << d != 0)
                });
                prop_assert!(!g.either_day && !possible, "{} after {}: none", g.text, iso(after));
                return Ok(());
            };
            prop_assert!(next > after, "{} after {}: {}", g.text, iso(after), iso(next));
            prop_assert!(matches(&g, next), "{} after {}: {} does not match", g.text, iso(after), iso(next));
            if !g.with_seconds {
                prop_assert_eq!(next.rem_euclid(60_000), 0);
            }
            // Nothing in between: the rest of `after`'s day, every whole day, then `next`'s day
            // up to it.
            let end_of_first_day = (after.div_euclid(86_400_000) + 1) * 86_400_000;
            if next <= end_of_first_day {
                assert_no_match_between(&g, after, next);
            } else {
                assert_no_match_between(&g, after, end_of_first_day);
                let next_day = Day::of(next);
                let mut day = Day::of(end_of_first_day);
                while day != next_day {
                    prop_assert!(!day_matches(&g, day), "{} after {}: skipped {:?} before {}", g.text, iso(after), day, iso(next));
                    day = day.next();
                }
                assert_no_match_between(&g, next.div_euclid(86_400_000) * 86_400_000 - 1, next);
            }
            prop_assert!(s.due(after, next));
            prop_assert!(!s.due(after, next - 1));
        }

        #[test]
        fn civil_dates_round_trip(days in -1_000_000_000i64..1_000_000_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert!((1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m));
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }

        #[test]
        fn parse_never_panics(text in "[ -~]{0,40}|[0-9*/,a-zA-Z@ -]{0,60}") {
            if let Ok(s) = Schedule::parse(&text) {
                prop_assert_eq!(Schedule::parse(s.as_str()).unwrap(), s.clone());
                s.next_after(0);
            }
        }
    }

    // Retention.

    fn policy(daily: u32, weekly: u32) -> Retention {
        Retention { daily, weekly }
    }

    /// Backups named by their creation time, so expectations read as dates.
    fn kept<S: AsRef<str>>(times: &[S], policy: Retention, now: &str) -> Vec<String> {
        let backups: Vec<(&str, i64)> =
            times.iter().map(|t| (t.as_ref(), ms(t.as_ref()))).collect();
        retained(&backups, policy, ms(now))
            .into_iter()
            .map(String::from)
            .collect()
    }

    fn daily_at_two(from_day: u32, to_day: u32, year_month: &str) -> Vec<String> {
        (from_day..=to_day)
            .map(|d| format!("{year_month}-{d:02}T02:00:00Z"))
            .collect()
    }

    #[test]
    fn thirty_daily_backups_keep_seven_days_and_four_weeks() {
        // March 2025: the 1st is a Saturday, the 30th a Sunday. ISO weeks (Monday starts) with
        // backups: 24-30, 17-23, 10-16, 3-9, and the 1st-2nd.
        let backups = daily_at_two(1, 30, "2025-03");
        let kept = kept(&backups, policy(7, 4), "2025-03-30T12:00:00Z");
        assert_eq!(
            kept,
            [
                "2025-03-09T02:00:00Z", // week of the 3rd
                "2025-03-16T02:00:00Z", // week of the 10th
                "2025-03-23T02:00:00Z", // week of the 17th
                "2025-03-24T02:00:00Z", // daily, from here on; the 30th is also this week's
                "2025-03-25T02:00:00Z",
                "2025-03-26T02:00:00Z",
                "2025-03-27T02:00:00Z",
                "2025-03-28T02:00:00Z",
                "2025-03-29T02:00:00Z",
                "2025-03-30T02:00:00Z",
            ]
        );
    }

    #[test]
    fn days_without_backups_do_not_count() {
        let backups = [
            "2025-03-01T02:00:00Z",
            "2025-03-02T02:00:00Z",
            "2025-03-05T02:00:00Z",
            "2025-03-09T02:00:00Z",
            "2025-03-10T02:00:00Z",
        ];
        // Nothing since the 10th, and `now` is weeks later: still the three newest days.
        assert_eq!(
            kept(&backups, policy(3, 0), "2025-04-20T00:00:00Z"),
            [
                "2025-03-05T02:00:00Z",
                "2025-03-09T02:00:00Z",
                "2025-03-10T02:00:00Z"
            ]
        );
        // Weeks with backups: 10th (Monday), 3-9, 1-2 (the week of 24 February).
        assert_eq!(
            kept(&backups, policy(0, 2), "2025-04-20T00:00:00Z"),
            ["2025-03-09T02:00:00Z", "2025-03-10T02:00:00Z"]
        );
        assert_eq!(
            kept(&backups, policy(10, 10), "2025-04-20T00:00:00Z"),
            backups
        );
        assert!(kept(&backups, policy(0, 0), "2025-04-20T00:00:00Z").is_empty());
        assert!(kept::<&str>(&[], policy(7, 4), "2025-04-20T00:00:00Z").is_empty());
    }

    #[test]
    fn several_backups_a_day_keep_the_newest() {
        let backups = [
            "2025-03-09T23:59:59Z",
            "2025-03-10T00:00:00Z",
            "2025-03-10T12:00:00Z",
            "2025-03-10T23:59:59Z",
            "2025-03-11T06:00:00Z",
            "2025-03-11T18:00:00Z",
        ];
        assert_eq!(
            kept(&backups, policy(2, 0), "2025-03-11T20:00:00Z"),
            ["2025-03-10T23:59:59Z", "2025-03-11T18:00:00Z"]
        );
        assert_eq!(
            kept(&backups, policy(3, 0), "2025-03-11T20:00:00Z"),
            [
                "2025-03-09T23:59:59Z",
                "2025-03-10T23:59:59Z",
                "2025-03-11T18:00:00Z"
            ]
        );
        // The 9th is a Sunday, so it is the newest of the previous week.
        assert_eq!(
            kept(&backups, policy(0, 2), "2025-03-11T20:00:00Z"),
            ["2025-03-09T23:59:59Z", "2025-03-11T18:00:00Z"]
        );
    }

    #[test]
    fn a_backup_kept_twice_is_listed_once() {
        let backups = daily_at_two(1, 30, "2025-03");
        let both = kept(&backups, policy(7, 1), "2025-03-30T12:00:00Z");
        // This week's newest is today's, which is also a daily keeper: seven, not eight.
        assert_eq!(both, kept(&backups, policy(7, 0), "2025-03-30T12:00:00Z"));
        assert_eq!(both.len(), 7);
        // Equal times: the greater id is the newer.
        let tied = [("b", 1000), ("a", 1000), ("c", 999)];
        assert_eq!(
            retained(&tied, policy(1, 1), 5000)
                .into_iter()
                .collect::<Vec<_>>(),
            ["b"]
        );
    }

    #[test]
    fn weeks_start_on_monday_across_the_year_end() {
        // 2024-12-30 is the Monday of ISO week 2025-W01; 2024-12-29 a Sunday of the week before.
        let backups = [
            "2024-12-29T10:00:00Z",
            "2024-12-30T10:00:00Z",
            "2024-12-31T10:00:00Z",
            "2025-01-05T10:00:00Z",
            "2025-01-06T10:00:00Z",
        ];
        assert_eq!(
            kept(&backups, policy(0, 3), "2025-01-06T12:00:00Z"),
            [
                "2024-12-29T10:00:00Z",
                "2025-01-05T10:00:00Z",
                "2025-01-06T10:00:00Z"
            ]
        );
    }

    #[test]
    fn future_backups_are_kept_and_take_no_slot() {
        let backups = [
            "2025-03-09T02:00:00Z",
            "2025-03-10T02:00:00Z",
            "2025-03-10T12:00:00Z", // after now: a skewed clock
            "2026-01-01T00:00:00Z",
        ];
        assert_eq!(
            kept(&backups, policy(1, 0), "2025-03-10T11:00:00Z"),
            [
                "2025-03-10T02:00:00Z",
                "2025-03-10T12:00:00Z",
                "2026-01-01T00:00:00Z"
            ]
        );
        assert_eq!(
            kept(&backups, policy(0, 0), "2025-03-10T11:00:00Z"),
            ["2025-03-10T12:00:00Z", "2026-01-01T00:00:00Z"]
        );
        // A backup made exactly now is not in the future.
        assert_eq!(
            kept(&backups[..2], policy(1, 0), "2025-03-10T02:00:00Z"),
            ["2025-03-10T02:00:00Z"]
        );
    }

    proptest! {
        #[test]
        fn retention_keeps_one_per_period_within_the_counts(
            times in proptest::collection::vec(0i64..200 * 86_400_000, 0..60),
            daily in 0u32..10,
            weekly in 0u32..6,
        ) {
            let ids: Vec<String> = (0..times.len()).map(|i| format!("b{i:03}")).collect();
            let backups: Vec<(&str, i64)> = ids.iter().map(String::as_str).zip(times.iter().copied()).collect();
            let now = 150 * 86_400_000;
            let keep = retained(&backups, policy(daily, weekly), now);
            let time_of = |id: &str| backups.iter().find(|b| b.0 == id).unwrap().1;
            for &(id, at) in &backups {
                if at > now {
                    prop_assert!(keep.contains(id));
                }
            }
            let past: BTreeSet<&str> = keep.iter().copied().filter(|&id| time_of(id) <= now).collect();
            prop_assert!(past.len() <= (daily + weekly) as usize);
            // Every kept past backup is the newest of its day (a week's newest is its day's too).
            for &id in &past {
                let at = time_of(id);
                prop_assert!(backups.iter().filter(|b| day_of(b.1) == day_of(at)).all(|b| (b.1, b.0) <= (at, id)));
            }
            // And the newest past backup is always kept when any rule keeps something.
            if daily + weekly > 0 {
                if let Some(newest) = backups.iter().filter(|b| b.1 <= now).max_by_key(|b| (b.1, b.0)) {
                    prop_assert!(keep.contains(newest.0));
                }
            }
        }
    }
}
