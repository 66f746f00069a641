//! Parsers of flag values: budgets and durations.

use std::time::Duration;

pub(crate) fn parse_max_unavailable(s: &str) -> Result<nixroll::rollout::MaxUnavailable, String> {
    use nixroll::rollout::MaxUnavailable;
    let (digits, percent) = match s.strip_suffix('%') {
        Some(d) => (d, true),
        None => (s, false),
    };
    let n: u32 = digits
        .parse()
        .map_err(|_| format!("expected N or N% (e.g. 1 or 10%), got {s:?}"))?;
    if n == 0 {
        return Err("must be at least 1".to_string());
    }
    if percent {
        if n > 100 {
            return Err("a percentage must be at most 100%".to_string());
        }
        Ok(MaxUnavailable::Percent(n))
    } else {
        Ok(MaxUnavailable::Count(n))
    }
}

pub(crate) fn parse_signed_duration(s: &str) -> Result<jiff::SignedDuration, String> {
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("expected a duration such as 90s, 15m or 1h30m: {e}"))?;
    if d.is_negative() || d.is_zero() {
        return Err("must be positive".to_string());
    }
    Ok(d)
}

pub(crate) fn parse_soak(s: &str) -> Result<jiff::SignedDuration, String> {
    nixroll::rollout::parse_duration(s).map_err(|e| e.to_string())
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration like 10s, 5m or 1h30m: {e}"))?;
    Duration::try_from(d).map_err(|e| format!("{s:?} must not be negative: {e}"))
}
