//! Durations and sizes as people write and read them.

use std::time::{Duration, SystemTime};

/// Parses `7d`, `12h`, `30m`, `45s`, `2w` or `0` (also combined: `1d12h`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = || {
        format!(
            "invalid duration `{text}`: use a number with a unit, such as 7d, 12h, 30m, 45s or 0"
        )
    };
    if text.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 60 * 60,
            'd' => 24 * 60 * 60,
            'w' => 7 * 24 * 60 * 60,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        number.clear();
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(bad)?;
    }
    if !number.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// `512 B`, `4.0 KiB`, `1.3 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// How long ago `time` was: `just now`, `5m ago`, `3h ago`, `2d ago`; `never` for `None`.
pub fn format_age(time: Option<SystemTime>, now: SystemTime) -> String {
    let Some(time) = time else {
        return "never".to_owned();
    };
    let secs = now.duration_since(time).unwrap_or_default().as_secs();
    match secs {
        0..=59 => "just now".to_owned(),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// `0.4s`, `41.2s`, `3m 05s`.
pub fn format_elapsed(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = d.as_secs();
        format!("{}m {:02}s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(
            parse_duration("1d12h"),
            Ok(Duration::from_secs(86_400 + 12 * 3600))
        );
        for bad in ["", "7", "d", "7x", "-1d", "1.5d", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn bytes() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(4096), "4.0 KiB");
        assert_eq!(format_bytes(1536 * 1024 * 1024), "1.5 GiB");
    }

    #[test]
    fn ages_and_elapsed() {
        let now = SystemTime::now();
        assert_eq!(format_age(None, now), "never");
        assert_eq!(format_age(Some(now), now), "just now");
        assert_eq!(
            format_age(Some(now - Duration::from_secs(300)), now),
            "5m ago"
        );
        assert_eq!(
            format_age(Some(now - Duration::from_secs(3 * 86_400)), now),
            "3d ago"
        );
        assert_eq!(format_elapsed(Duration::from_millis(41_230)), "41.2s");
        assert_eq!(format_elapsed(Duration::from_secs(185)), "3m 05s");
    }
}
