//! Weekly maintenance windows evaluated in their IANA time zone (jiff's bundled tzdb).
//!
//! A window opens on each listed weekday (every day when `days` is empty) at local `start` and
//! closes at local `end`; `end < start` means it closes on the following day. The window belongs
//! to the day it *opened* on. `start` is inclusive, `end` exclusive.
//!
//! Daylight saving time, resolved so that a window is never skipped and never doubled:
//! * a wall-clock time that does not exist (spring-forward gap) resolves to the first instant
//!   after the gap (a 02:30 start on a day where 02:00 jumps to 03:00 opens at 03:00);
//! * a wall-clock time that exists twice (fall-back fold) resolves to the *earlier* instant for
//!   `start` and the *later* instant for `end`, so the window covers its whole wall-clock span
//!   (a 01:00–03:00 window in New York on the fall-back day lasts three real hours);
//! * a window lying entirely inside a gap opens at the end of the gap and lasts its nominal
//!   (wall-clock) length.

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{SignedDuration, Timestamp, ToSpan};

use crate::api::MaintenanceWindow;

/// A window that could not be understood. The node gets the `InvalidSpec` reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("maintenance window {field} {value:?} is not a 24-hour HH:MM time")]
    ParseTime { field: &'static str, value: String },
    #[error("maintenance window time zone {zone:?} is not a known IANA time zone")]
    LookupZone { zone: String },
    #[error("maintenance window has start == end ({value}); omit maintenanceWindows to allow any time")]
    EmptyWindow { value: String },
    #[error("maintenance window in {zone:?} could not be placed on {date}: {message}")]
    ResolveInstant {
        zone: String,
        date: String,
        message: String,
    },
}

/// A parsed window, ready to evaluate many times.
#[derive(Clone, Debug)]
pub struct Window {
    days: Vec<jiff::civil::Weekday>,
    start: Time,
    end: Time,
    tz: TimeZone,
    zone: String,
}

/// Parse `HH:MM` (24 h).
pub fn parse_hhmm(field: &'static str, value: &str) -> Result<Time, WindowError> {
    let err = || WindowError::ParseTime {
        field,
        value: value.to_string(),
    };
    let (h, m) = value.split_once(':').ok_or_else(err)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(err());
    }
    let h: i8 = h.parse().map_err(|_| err())?;
    let m: i8 = m.parse().map_err(|_| err())?;
    if !(0..24).contains(&h) || !(0..60).contains(&m) {
        return Err(err());
    }
    Time::new(h, m, 0, 0).map_err(|_| err())
}

impl Window {
    pub fn parse(w: &MaintenanceWindow) -> Result<Window, WindowError> {
        let start = parse_hhmm("start", &w.start)?;
        let end = parse_hhmm("end", &w.end)?;
        if start == end {
            return Err(WindowError::EmptyWindow {
                value: w.start.clone(),
            });
        }
        let tz = TimeZone::get(&w.time_zone).map_err(|_| WindowError::LookupZone {
            zone: w.time_zone.clone(),
        })?;
        Ok(Window {
            days: w.days.iter().map(|d| d.to_jiff()).collect(),
            start,
            end,
            tz,
            zone: w.time_zone.clone(),
        })
    }

    fn opens_on(&self, date: Date) -> bool {
        self.days.is_empty() || self.days.contains(&date.weekday())
    }

    /// Nominal wall-clock length of the window.
    fn nominal(&self) -> SignedDuration {
        let d = self.end.duration_since(self.start);
        if d.is_negative() {
            d + SignedDuration::from_hours(24)
        } else {
            d
        }
    }

    fn resolve(&self, dt: DateTime, prefer_later: bool) -> Result<Timestamp, WindowError> {
        let err = |message: String| WindowError::ResolveInstant {
            zone: self.zone.clone(),
            date: dt.to_string(),
            message,
        };
        let amb = self.tz.to_ambiguous_timestamp(dt);
        match amb.offset() {
            AmbiguousOffset::Unambiguous { offset } => {
                offset.to_timestamp(dt).map_err(|e| err(e.to_string()))
            }
            AmbiguousOffset::Fold { before, after } => {
                let a = before.to_timestamp(dt).map_err(|e| err(e.to_string()))?;
                let b = after.to_timestamp(dt).map_err(|e| err(e.to_string()))?;
                Ok(if prefer_later { a.max(b) } else { a.min(b) })
            }
            AmbiguousOffset::Gap { before, after } => {
                // The instant the clocks jumped: the first transition after the earliest
                // reading of `dt`.
                let a = before.to_timestamp(dt).map_err(|e| err(e.to_string()))?;
                let b = after.to_timestamp(dt).map_err(|e| err(e.to_string()))?;
                let lo = a.min(b);
                let hi = a.max(b);
                let t = self
                    .tz
                    .following(lo)
                    .next()
                    .map(|tr| tr.timestamp())
                    .filter(|t| *t <= hi)
                    .unwrap_or(hi);
                Ok(t)
            }
        }
    }

    /// The occurrence that opens on local `date` (if the window opens that day).
    fn occurrence(&self, date: Date) -> Result<Option<(Timestamp, Timestamp)>, WindowError> {
        if !self.opens_on(date) {
            return Ok(None);
        }
        let start = self.resolve(date.to_datetime(self.start), false)?;
        let end_date = if self.end < self.start {
            date.checked_add(1.day())
                .map_err(|e| WindowError::ResolveInstant {
                    zone: self.zone.clone(),
                    date: date.to_string(),
                    message: e.to_string(),
                })?
        } else {
            date
        };
        let mut end = self.resolve(end_date.to_datetime(self.end), true)?;
        if end <= start {
            // The whole window fell into a gap: keep its nominal length.
            end = start.saturating_add(self.nominal()).unwrap_or(start);
        }
        Ok(Some((start, end)))
    }

    fn local_date(&self, now: Timestamp) -> Date {
        now.to_zoned(self.tz.clone()).date()
    }

    /// Whether `now` lies inside an occurrence of this window.
    pub fn contains(&self, now: Timestamp) -> Result<bool, WindowError> {
        let today = self.local_date(now);
        for back in [1i64, 0] {
            let Ok(d) = today.checked_sub(back.days()) else {
                continue;
            };
            if let Some((s, e)) = self.occurrence(d)?
                && s <= now
                && now < e
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The occurrence containing `now`, or else the next one to open: `(start, end)`.
    pub fn current_or_next(&self, now: Timestamp) -> Result<Option<(Timestamp, Timestamp)>, WindowError> {
        let today = self.local_date(now);
        let mut best: Option<(Timestamp, Timestamp)> = None;
        for off in -1i64..=8 {
            let Ok(d) = today.checked_add(off.days()) else {
                continue;
            };
            if let Some((s, e)) = self.occurrence(d)? {
                if e <= now {
                    continue;
                }
                if s <= now {
                    return Ok(Some((s, e)));
                }
                if best.is_none_or(|(bs, _)| s < bs) {
                    best = Some((s, e));
                }
            }
        }
        Ok(best)
    }
}

/// Parse every window of a spec.
pub fn parse_all(windows: &[MaintenanceWindow]) -> Result<Vec<Window>, WindowError> {
    windows.iter().map(Window::parse).collect()
}

/// Whether a disruptive step may start at `now`. No windows = always open.
pub fn is_open(windows: &[MaintenanceWindow], now: Timestamp) -> Result<bool, WindowError> {
    if windows.is_empty() {
        return Ok(true);
    }
    is_open_parsed(&parse_all(windows)?, now)
}

/// [`is_open`] on already parsed windows.
pub fn is_open_parsed(windows: &[Window], now: Timestamp) -> Result<bool, WindowError> {
    for w in windows {
        if w.contains(now)? {
            return Ok(true);
        }
    }
    Ok(windows.is_empty())
}

/// When the next window opens: `Some(now)` when one is open now (or there are no windows),
/// `None` when no window will ever open (cannot happen for valid windows).
pub fn next_opening(windows: &[MaintenanceWindow], now: Timestamp) -> Result<Option<Timestamp>, WindowError> {
    if windows.is_empty() {
        return Ok(Some(now));
    }
    next_opening_parsed(&parse_all(windows)?, now)
}

/// [`next_opening`] on already parsed windows.
pub fn next_opening_parsed(windows: &[Window], now: Timestamp) -> Result<Option<Timestamp>, WindowError> {
    if windows.is_empty() {
        return Ok(Some(now));
    }
    let mut best: Option<Timestamp> = None;
    for w in windows {
        if let Some((s, _)) = w.current_or_next(now)? {
            let s = s.max(now);
            if best.is_none_or(|b| s < b) {
                best = Some(s);
            }
        }
    }
    Ok(best)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::api::Weekday;

    pub(crate) fn mk_window(days: &[Weekday], start: &str, end: &str, tz: &str) -> MaintenanceWindow {
        MaintenanceWindow {
            days: days.to_vec(),
            start: start.into(),
            end: end.into(),
            time_zone: tz.into(),
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn open(w: &MaintenanceWindow, at: &str) -> bool {
        is_open(std::slice::from_ref(w), ts(at)).unwrap()
    }

    #[test]
    fn empty_list_is_always_open() {
        assert!(is_open(&[], ts("2026-01-01T00:00:00Z")).unwrap());
        assert_eq!(
            next_opening(&[], ts("2026-01-01T00:00:00Z")).unwrap(),
            Some(ts("2026-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn start_inclusive_end_exclusive() {
        let w = mk_window(&[], "02:00", "04:00", "UTC");
        assert!(!open(&w, "2026-03-02T01:59:59Z"));
        assert!(open(&w, "2026-03-02T02:00:00Z"));
        assert!(open(&w, "2026-03-02T03:59:59Z"));
        assert!(!open(&w, "2026-03-02T04:00:00Z"));
    }

    #[test]
    fn day_filter_uses_local_day() {
        // 2026-03-02 is a Monday. 23:30 UTC Monday is 00:30 Tuesday in Berlin.
        let w = mk_window(&[Weekday::Tue], "00:00", "01:00", "Europe/Berlin");
        assert!(open(&w, "2026-03-02T23:30:00Z"));
        assert!(!open(&w, "2026-03-03T23:30:00Z"));
    }

    #[test]
    fn crossing_midnight_belongs_to_opening_day() {
        // Saturday 22:00 → Sunday 03:00; 2026-03-07 is a Saturday.
        let w = mk_window(&[Weekday::Sat], "22:00", "03:00", "UTC");
        assert!(open(&w, "2026-03-07T22:00:00Z"));
        assert!(open(&w, "2026-03-08T02:59:00Z"));
        assert!(!open(&w, "2026-03-08T03:00:00Z"));
        // Sunday 22:00 is not a window (it only opens on Saturday).
        assert!(!open(&w, "2026-03-08T22:30:00Z"));
        // Friday night → Saturday early is not in it either.
        assert!(!open(&w, "2026-03-07T01:00:00Z"));
    }

    #[test]
    fn next_opening_finds_next_week() {
        let w = mk_window(&[Weekday::Sat], "22:00", "03:00", "UTC");
        let n = next_opening(std::slice::from_ref(&w), ts("2026-03-08T03:00:00Z")).unwrap();
        assert_eq!(n, Some(ts("2026-03-14T22:00:00Z")));
        let n = next_opening(std::slice::from_ref(&w), ts("2026-03-08T01:00:00Z")).unwrap();
        assert_eq!(n, Some(ts("2026-03-08T01:00:00Z")));
    }

    #[test]
    fn spring_forward_gap_start_opens_at_gap_end_berlin() {
        // 2026-03-29: Berlin jumps 02:00 CET → 03:00 CEST (01:00Z).
        let w = mk_window(&[], "02:30", "04:00", "Europe/Berlin");
        assert!(!open(&w, "2026-03-29T00:59:59Z"));
        assert!(open(&w, "2026-03-29T01:00:00Z")); // 03:00 CEST, first instant after the gap
        assert!(open(&w, "2026-03-29T01:59:00Z"));
        assert!(!open(&w, "2026-03-29T02:00:00Z")); // 04:00 CEST
        // It opens exactly once that day.
        let n = next_opening(std::slice::from_ref(&w), ts("2026-03-28T12:00:00Z")).unwrap();
        assert_eq!(n, Some(ts("2026-03-29T01:00:00Z")));
    }

    #[test]
    fn window_entirely_in_gap_keeps_nominal_length() {
        // New York 2026-03-08: 02:00 EST → 03:00 EDT (07:00Z).
        let w = mk_window(&[], "02:00", "02:30", "America/New_York");
        assert!(!open(&w, "2026-03-08T06:59:00Z"));
        assert!(open(&w, "2026-03-08T07:00:00Z"));
        assert!(open(&w, "2026-03-08T07:29:00Z"));
        assert!(!open(&w, "2026-03-08T07:30:00Z"));
    }

    #[test]
    fn fall_back_fold_covers_whole_wall_clock_span_new_york() {
        // 2026-11-01: New York 02:00 EDT → 01:00 EST. 01:00 EDT = 05:00Z, 03:00 EST = 08:00Z.
        let w = mk_window(&[], "01:00", "03:00", "America/New_York");
        assert!(!open(&w, "2026-11-01T04:59:00Z"));
        assert!(open(&w, "2026-11-01T05:00:00Z"));
        assert!(open(&w, "2026-11-01T06:30:00Z")); // 01:30 EST (second time round)
        assert!(open(&w, "2026-11-01T07:59:00Z"));
        assert!(!open(&w, "2026-11-01T08:00:00Z"));
        // Opens once: after it opened, the next opening is the next day.
        let n = next_opening(std::slice::from_ref(&w), ts("2026-11-01T08:00:00Z")).unwrap();
        assert_eq!(n, Some(ts("2026-11-02T06:00:00Z")));
    }

    #[test]
    fn fall_back_end_in_fold_uses_later_instant_berlin() {
        // 2026-10-25: Berlin 03:00 CEST → 02:00 CET (01:00Z). 02:30 occurs at 00:30Z and 01:30Z.
        let w = mk_window(&[], "01:00", "02:30", "Europe/Berlin");
        assert!(open(&w, "2026-10-24T23:00:00Z")); // 01:00 CEST
        assert!(open(&w, "2026-10-25T01:29:00Z")); // 02:29 CET
        assert!(!open(&w, "2026-10-25T01:30:00Z"));
        // A window starting in the fold starts at the earlier instant.
        let w2 = mk_window(&[], "02:30", "04:00", "Europe/Berlin");
        assert!(!open(&w2, "2026-10-25T00:29:00Z"));
        assert!(open(&w2, "2026-10-25T00:30:00Z"));
        assert!(open(&w2, "2026-10-25T02:59:00Z"));
        assert!(!open(&w2, "2026-10-25T03:00:00Z"));
    }

    #[test]
    fn parse_errors_are_typed() {
        let bad = mk_window(&[], "25:00", "03:00", "UTC");
        assert!(matches!(
            is_open(&[bad], ts("2026-01-01T00:00:00Z")),
            Err(WindowError::ParseTime { field: "start", .. })
        ));
        let bad = mk_window(&[], "01:00", "3:00", "UTC");
        assert!(matches!(
            is_open(&[bad], ts("2026-01-01T00:00:00Z")),
            Err(WindowError::ParseTime { field: "end", .. })
        ));
        let bad = mk_window(&[], "01:00", "03:00", "Mars/Olympus");
        assert!(matches!(
            is_open(&[bad], ts("2026-01-01T00:00:00Z")),
            Err(WindowError::LookupZone { .. })
        ));
    }

    #[test]
    fn any_of_several_windows() {
        let a = mk_window(&[Weekday::Mon], "01:00", "02:00", "UTC");
        let b = mk_window(&[Weekday::Mon], "05:00", "06:00", "UTC");
        let ws = [a, b];
        assert!(is_open(&ws, ts("2026-03-02T05:30:00Z")).unwrap());
        assert!(!is_open(&ws, ts("2026-03-02T03:00:00Z")).unwrap());
        assert_eq!(
            next_opening(&ws, ts("2026-03-02T03:00:00Z")).unwrap(),
            Some(ts("2026-03-02T05:00:00Z"))
        );
    }
}
