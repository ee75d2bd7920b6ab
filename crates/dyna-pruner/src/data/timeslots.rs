//! Time stamps of crowd-flow frames: `YYYYMMDDHH` (hour of day 00..23) or ST-ResNet's
//! `YYYYMMDDSS` slot numbers (01..48 half-hours, or 01..24 hours), turned into one global slot
//! counter in which consecutive frames differ by exactly 1.

use serde::{Deserialize, Serialize};

/// How the last two digits of a time stamp are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotFormat {
    /// Decide from the values: any `00` means hours 00..23; else slots 01..24 or 01..48.
    Auto,
    /// `HH` = hour of day 00..23.
    Hour,
    /// ST-ResNet hourly slots 01..24.
    Slot24,
    /// ST-ResNet half-hour slots 01..48 (TaxiBJ).
    Slot48,
}

impl SlotFormat {
    /// Slots per day and the value of the first slot of a day.
    fn layout(self) -> (i64, i64) {
        match self {
            SlotFormat::Hour => (24, 0),
            SlotFormat::Slot24 => (24, 1),
            SlotFormat::Slot48 => (48, 1),
            SlotFormat::Auto => unreachable!("resolved before use"),
        }
    }
}

/// A calendar date as `YYYYMMDD`, comparable as an integer.
pub type Ymd = u32;

/// One parsed time stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub date: Ymd,
    /// Global slot counter: days since 1970-01-01 times slots per day plus the slot of the day.
    pub slot: i64,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `(year, month, day)` of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The `YYYYMMDD` date of a day count since 1970-01-01.
pub fn date_of_days(days: i64) -> Ymd {
    let (y, m, d) = civil_from_days(days);
    (y * 10_000 + m * 100 + d) as Ymd
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Parses `YYYYMMDD` (also `YYYY-MM-DD`), checking month and day ranges.
pub fn parse_date(text: &str) -> Option<(i64, i64, i64)> {
    let digits: String = text.chars().filter(|c| *c != '-').collect();
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let y: i64 = digits[0..4].parse().ok()?;
    let m: i64 = digits[4..6].parse().ok()?;
    let d: i64 = digits[6..8].parse().ok()?;
    ((1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m)).then_some((y, m, d))
}

/// Parses a list of 10-digit stamps. Errors name the first bad stamp and its row.
pub fn parse_stamps(raw: &[String], format: SlotFormat) -> Result<(Vec<Stamp>, SlotFormat), String> {
    let mut parts = Vec::with_capacity(raw.len());
    for (row, s) in raw.iter().enumerate() {
        let bad = || format!("row {row}: `{s}` is not YYYYMMDDHH / YYYYMMDDSS");
        // ASCII first: slicing at byte 8 of a string with multi-byte characters would panic.
        if s.len() != 10 || !s.is_ascii() {
            return Err(bad());
        }
        let (y, m, d) = parse_date(&s[..8]).ok_or_else(bad)?;
        let tail: i64 = s[8..].parse().map_err(|_| bad())?;
        parts.push((y, m, d, tail));
    }
    let format = match format {
        SlotFormat::Auto => {
            let min = parts.iter().map(|p| p.3).min().unwrap_or(0);
            let max = parts.iter().map(|p| p.3).max().unwrap_or(0);
            if min == 0 {
                SlotFormat::Hour
            } else if max <= 24 {
                SlotFormat::Slot24
            } else {
                SlotFormat::Slot48
            }
        }
        f => f,
    };
    let (per_day, first) = format.layout();
    let stamps = parts
        .iter()
        .zip(raw)
        .enumerate()
        .map(|(row, (&(y, m, d, tail), s))| {
            let of_day = tail - first;
            if !(0..per_day).contains(&of_day) {
                return Err(format!(
                    "row {row}: `{s}` has slot {tail}, outside {first}..={} for format {format:?}",
                    first + per_day - 1
                ));
            }
            Ok(Stamp { date: (y * 10_000 + m * 100 + d) as Ymd, slot: days_from_civil(y, m, d) * per_day + of_day })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((stamps, format))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        for (y, m, d) in [(1970, 1, 1), (2019, 3, 31), (2000, 2, 29), (1969, 12, 31), (2024, 12, 31)] {
            assert_eq!(civil_from_days(days_from_civil(y, m, d)), (y, m, d));
        }
        for days in [-1000, 0, 11_017, 14_975, 15_400] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(date_of_days(days_from_civil(2019, 3, 1)), 20190301);
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn hours_cross_midnight_consecutively() {
        let (st, f) = parse_stamps(&strings(&["2010022823", "2010030100"]), SlotFormat::Auto).unwrap();
        assert_eq!(f, SlotFormat::Hour);
        assert_eq!(st[1].slot - st[0].slot, 1);
        assert_eq!(st[1].date, 20100301);
    }

    #[test]
    fn st_resnet_half_hour_slots() {
        let (st, f) = parse_stamps(&strings(&["2013070148", "2013070201"]), SlotFormat::Auto).unwrap();
        assert_eq!(f, SlotFormat::Slot48);
        assert_eq!(st[1].slot - st[0].slot, 1);
    }

    #[test]
    fn rejects_bad_dates_and_slots() {
        assert!(parse_stamps(&strings(&["2010023001"]), SlotFormat::Auto).is_err());
        assert!(parse_stamps(&strings(&["20100301"]), SlotFormat::Auto).is_err());
        assert!(parse_stamps(&strings(&["2010030124"]), SlotFormat::Hour).is_err());
    }

    #[test]
    fn civil_days_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    /// Issue 25 (found by fuzzing): a stamp of ten bytes holding multi-byte characters was
    /// sliced at byte 8 and panicked.
    #[test]
    fn a_stamp_with_multibyte_characters_is_an_error_not_a_panic() {
        let err = parse_stamps(&["2010010р1".to_string()], SlotFormat::Auto).unwrap_err();
        assert!(err.contains("row 0") && err.contains("YYYYMMDDHH"), "{err}");
    }
}
