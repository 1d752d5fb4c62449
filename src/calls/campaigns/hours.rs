//! Calling hours in the recipient's local time. Candidate zones come from an explicit IANA
//! name or from the number (libphonenumber's prefix → time-zone map, generated into
//! `tzmap.tsv` by `scripts/gen-tzmap.py`); chrono-tz supplies the rules, daylight saving
//! included. A recipient is inside its window only when every candidate zone is.

use std::collections::HashMap;
use std::sync::OnceLock;

use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// libphonenumber's map: `<E.164 digits prefix>\t<zone>[,<zone>…]`, with its license header.
const TZMAP: &str = include_str!("tzmap.tsv");

struct PrefixMap {
    zones: HashMap<&'static str, Vec<Tz>>,
    longest: usize,
}

fn map() -> &'static PrefixMap {
    static MAP: OnceLock<PrefixMap> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut zones = HashMap::new();
        let mut longest = 0;
        for line in TZMAP.lines().filter(|l| !l.starts_with('#')) {
            let Some((prefix, names)) = line.split_once('\t') else {
                continue;
            };
            // A name chrono-tz does not know (none today) is skipped, never guessed.
            let tz: Vec<Tz> = names.split(',').filter_map(|n| n.parse().ok()).collect();
            longest = longest.max(prefix.len());
            zones.insert(prefix, tz);
        }
        PrefixMap { zones, longest }
    })
}

/// The zones an E.164 number may be in (longest known prefix); empty when unknown.
pub fn zones_for_number(number: &str) -> Vec<Tz> {
    let digits = number.trim_start_matches('+');
    let m = map();
    for len in (1..=m.longest.min(digits.len())).rev() {
        if let Some(z) = m.zones.get(&digits[..len]) {
            return z.clone();
        }
    }
    Vec::new()
}

/// A recipient's candidate zones: its explicit zone, else its number's.
pub fn candidate_zones(number: &str, timezone: Option<&str>) -> Vec<Tz> {
    match timezone.filter(|t| !t.is_empty()) {
        Some(name) => name.parse::<Tz>().into_iter().collect(),
        None => zones_for_number(number),
    }
}

/// A campaign's calling window: local `[start, end)` minutes after midnight on `days`
/// (bit 0 = Monday).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_min: u32,
    pub end_min: u32,
    pub days: u8,
}

impl Window {
    fn inside_one(&self, tz: Tz, at: DateTime<Utc>) -> bool {
        let local = at.with_timezone(&tz);
        let day = local.weekday().num_days_from_monday();
        let min = local.hour() * 60 + local.minute();
        self.days & (1 << day) != 0 && self.start_min <= min && min < self.end_min
    }

    /// Whether `at` is inside the window in every zone of `zones` (false for none).
    pub fn inside(&self, zones: &[Tz], at: DateTime<Utc>) -> bool {
        !zones.is_empty() && zones.iter().all(|&tz| self.inside_one(tz, at))
    }

    /// The first instant at or after `now` inside the window in every zone; `None` when the
    /// zones' windows never meet in the next week.
    pub fn next_opening(&self, zones: &[Tz], now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if zones.is_empty() {
            return None;
        }
        if self.inside(zones, now) {
            return Some(now);
        }
        let mut candidates = Vec::new();
        for &tz in zones {
            let today = now.with_timezone(&tz).date_naive();
            for d in 0..=8 {
                let date = today + Duration::days(d);
                if self.days & (1 << date.weekday().num_days_from_monday()) == 0 {
                    continue;
                }
                let Some(time) =
                    chrono::NaiveTime::from_hms_opt(self.start_min / 60, self.start_min % 60, 0)
                else {
                    continue;
                };
                // An opening inside a spring-forward gap opens at the end of the gap.
                let local = date.and_time(time);
                let at = tz
                    .from_local_datetime(&local)
                    .earliest()
                    .or_else(|| {
                        tz.from_local_datetime(&(local + Duration::hours(1)))
                            .earliest()
                    })
                    .map(|t| t.with_timezone(&Utc));
                if let Some(at) = at.filter(|&t| t > now) {
                    candidates.push(at);
                }
            }
        }
        candidates.sort();
        candidates.into_iter().find(|&c| self.inside(zones, c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    const WEEK: u8 = 0b0111_1111;

    #[test]
    fn numbers_map_to_zones() {
        assert_eq!(
            zones_for_number("+12125550100"),
            vec![Tz::America__New_York]
        );
        let sd = zones_for_number("+16055550100");
        assert!(sd.contains(&Tz::America__Denver) && sd.len() == 2, "{sd:?}");
        assert_eq!(zones_for_number("+4930123456"), vec![Tz::Europe__Berlin]);
        assert!(zones_for_number("+99912345678").is_empty());
        assert_eq!(
            candidate_zones("+12125550100", Some("Asia/Tokyo")),
            vec![Tz::Asia__Tokyo]
        );
        assert!(candidate_zones("+12125550100", Some("Mars/Olympus")).is_empty());
    }

    #[test]
    fn a_two_zone_area_code_needs_both_inside() {
        // 605 (South Dakota): Central and Mountain. 09:00 Mountain = 10:00 Central.
        let w = Window {
            start_min: 9 * 60,
            end_min: 20 * 60,
            days: WEEK,
        };
        let zones = zones_for_number("+16055550100");
        // 14:30 UTC in July: 09:30 Central (CDT) but 08:30 Mountain (MDT): not yet.
        let now = utc("2026-07-15T14:30:00Z");
        assert!(!w.inside(&zones, now));
        assert_eq!(
            w.next_opening(&zones, now),
            Some(utc("2026-07-15T15:00:00Z"))
        );
        // 20:30 CDT is past the window in Central although 19:30 MDT is inside.
        assert!(!w.inside(&zones, utc("2026-07-16T01:30:00Z")));
    }

    #[test]
    fn daylight_saving_moves_the_opening() {
        let w = Window {
            start_min: 9 * 60,
            end_min: 20 * 60,
            days: WEEK,
        };
        let ny = [Tz::America__New_York];
        // US clocks spring forward on Sunday 2026-03-08: 09:00 is 14:00Z before, 13:00Z after.
        assert_eq!(
            w.next_opening(&ny, utc("2026-03-08T01:30:00Z")),
            Some(utc("2026-03-08T13:00:00Z"))
        );
        assert_eq!(
            w.next_opening(&ny, utc("2026-03-07T01:30:00Z")),
            Some(utc("2026-03-07T14:00:00Z"))
        );
        // Autumn: back to 14:00Z after 2026-11-01.
        assert_eq!(
            w.next_opening(&ny, utc("2026-11-01T02:00:00Z")),
            Some(utc("2026-11-01T14:00:00Z"))
        );
    }

    #[test]
    fn days_are_honoured() {
        // Monday to Friday only; Saturday 2026-07-18 evening → Monday 09:00 Berlin.
        let w = Window {
            start_min: 9 * 60,
            end_min: 17 * 60,
            days: 0b0001_1111,
        };
        let berlin = [Tz::Europe__Berlin];
        assert_eq!(
            w.next_opening(&berlin, utc("2026-07-18T10:00:00Z")),
            Some(utc("2026-07-20T07:00:00Z"))
        );
    }

    #[test]
    fn windows_that_never_meet() {
        let w = Window {
            start_min: 9 * 60,
            end_min: 12 * 60,
            days: WEEK,
        };
        let zones = [Tz::America__New_York, Tz::Asia__Tokyo];
        assert_eq!(w.next_opening(&zones, utc("2026-07-15T14:30:00Z")), None);
    }
}
