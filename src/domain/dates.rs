//! Calendar dates as the registry knows them: often only to the month or year.

use std::fmt;

use chrono::{Datelike, Days, NaiveDate};

use super::DomainError;

/// The earliest year the registry accepts in any date.
pub const MIN_YEAR: i32 = 1880;

fn parse_year(s: &str) -> Option<i32> {
    (s.len() == 4 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
        .filter(|y| *y >= MIN_YEAR)
}

fn parse_2(s: &str) -> Option<u32> {
    (s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

fn last_day_of_month(year: i32, month: u32) -> NaiveDate {
    let (y, m) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1).expect("valid month") - Days::new(1)
}

/// A year and month, `YYYY-MM` (the birth date is kept to the month only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct YearMonth {
    year: i32,
    month: u32,
}

impl YearMonth {
    const FORMAT: &'static str = "a year and month, \"YYYY-MM\", from 1880 on";

    pub fn parse(s: &str) -> Result<Self, DomainError> {
        if s.is_empty() {
            return Err(DomainError::Missing);
        }
        let (y, m) = s.split_once('-').ok_or(DomainError::Format(Self::FORMAT))?;
        match (parse_year(y), parse_2(m)) {
            (Some(year), Some(month)) if (1..=12).contains(&month) => Ok(YearMonth { year, month }),
            _ => Err(DomainError::Format(Self::FORMAT)),
        }
    }

    pub fn year(&self) -> i32 {
        self.year
    }

    pub fn month(&self) -> u32 {
        self.month
    }

    pub fn as_partial(&self) -> PartialDate {
        PartialDate {
            year: self.year,
            month: Some(self.month),
            day: None,
        }
    }
}

impl fmt::Display for YearMonth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// A date known to the day, month or year: `YYYY-MM-DD`, `YYYY-MM` or `YYYY`. It stands
/// for the interval from [`PartialDate::earliest`] to [`PartialDate::latest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartialDate {
    year: i32,
    month: Option<u32>,
    day: Option<u32>,
}

impl PartialDate {
    const FORMAT: &'static str = "a date \"YYYY-MM-DD\", or \"YYYY-MM\" or \"YYYY\" when only that much is known, from 1880 on";

    pub fn parse(s: &str) -> Result<Self, DomainError> {
        if s.is_empty() {
            return Err(DomainError::Missing);
        }
        let bad = DomainError::Format(Self::FORMAT);
        let mut parts = s.split('-');
        let year = parts.next().and_then(parse_year).ok_or(bad)?;
        let month = parts
            .next()
            .map(|m| parse_2(m).filter(|m| (1..=12).contains(m)).ok_or(bad))
            .transpose()?;
        let day = parts.next().map(|d| parse_2(d).ok_or(bad)).transpose()?;
        if parts.next().is_some() {
            return Err(bad);
        }
        if let (Some(m), Some(d)) = (month, day) {
            NaiveDate::from_ymd_opt(year, m, d)
                .ok_or(DomainError::Rule("must be a real calendar date"))?;
        }
        Ok(PartialDate { year, month, day })
    }

    pub fn from_date(d: NaiveDate) -> Self {
        PartialDate {
            year: d.year(),
            month: Some(d.month()),
            day: Some(d.day()),
        }
    }

    pub fn year(&self) -> i32 {
        self.year
    }

    /// Whether the date is known to the day.
    pub fn is_day(&self) -> bool {
        self.day.is_some()
    }

    /// The first day the date can stand for.
    pub fn earliest(&self) -> NaiveDate {
        NaiveDate::from_ymd_opt(self.year, self.month.unwrap_or(1), self.day.unwrap_or(1))
            .expect("checked at parse")
    }

    /// The last day the date can stand for.
    pub fn latest(&self) -> NaiveDate {
        match (self.month, self.day) {
            (Some(m), Some(d)) => {
                NaiveDate::from_ymd_opt(self.year, m, d).expect("checked at parse")
            }
            (Some(m), None) => last_day_of_month(self.year, m),
            _ => last_day_of_month(self.year, 12),
        }
    }

    /// The middle of the interval, used to estimate ages and delays.
    pub fn midpoint(&self) -> NaiveDate {
        let span = (self.latest() - self.earliest()).num_days();
        self.earliest() + Days::new((span / 2) as u64)
    }

    /// The day whole months are counted from and to: the date's own day, the 15th of its
    /// month for a month, the 1st of July for a year. The same day of every month and
    /// year, unlike [`PartialDate::midpoint`] (the 16th of a month of 31 days, the 15th of
    /// one of 30; the 2nd of July, or the 1st in a leap year), so that January 2010 to
    /// January 2015, or 2012 to 2017, are 60 whole months. At most a day from the
    /// midpoint.
    pub fn month_anchor(&self) -> NaiveDate {
        let (month, day) = match (self.month, self.day) {
            (Some(m), Some(d)) => (m, d),
            (Some(m), None) => (m, 15),
            _ => (7, 1),
        };
        NaiveDate::from_ymd_opt(self.year, month, day).expect("checked at parse")
    }

    /// True when every day this date can stand for lies before every day of `other`.
    pub fn definitely_before(&self, other: &PartialDate) -> bool {
        self.latest() < other.earliest()
    }

    /// True when the date lies wholly after `today`.
    pub fn is_future(&self, today: NaiveDate) -> bool {
        self.earliest() > today
    }
}

/// The whole calendar months from `from` to `to` (0 when `to` is not after `from`): a
/// month is whole when `to` has reached `from`'s day of the month (January 31st to
/// February 28th is none, to March 1st one; February 29th to February 28th of the next year
/// is 11).
pub fn whole_months(from: NaiveDate, to: NaiveDate) -> i64 {
    if to <= from {
        return 0;
    }
    let months =
        i64::from(to.year() - from.year()) * 12 + i64::from(to.month()) - i64::from(from.month());
    months - i64::from(to.day() < from.day())
}

impl fmt::Display for PartialDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}", self.year)?;
        if let Some(m) = self.month {
            write!(f, "-{m:02}")?;
        }
        if let Some(d) = self.day {
            write!(f, "-{d:02}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(s: &str) -> PartialDate {
        PartialDate::parse(s).unwrap()
    }

    #[test]
    fn parses_the_three_precisions() {
        assert_eq!(d("2016").to_string(), "2016");
        assert_eq!(d("2016-02").to_string(), "2016-02");
        assert_eq!(d("2016-02-29").to_string(), "2016-02-29");
        for bad in [
            "",
            "16",
            "2016-2",
            "2016-13",
            "2016-02-30",
            "2015-02-29",
            "2016-02-01-01",
            "1879",
            "2016/02",
            "２０１６",
        ] {
            assert!(PartialDate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn intervals() {
        let feb = d("2016-02");
        assert_eq!(feb.earliest(), NaiveDate::from_ymd_opt(2016, 2, 1).unwrap());
        assert_eq!(feb.latest(), NaiveDate::from_ymd_opt(2016, 2, 29).unwrap());
        assert_eq!(
            d("2016").latest(),
            NaiveDate::from_ymd_opt(2016, 12, 31).unwrap()
        );
        assert_eq!(
            d("2016").midpoint(),
            NaiveDate::from_ymd_opt(2016, 7, 1).unwrap()
        );
        assert!(d("2015").definitely_before(&d("2016-01-01")));
        assert!(
            !d("2016").definitely_before(&d("2016-03")),
            "overlapping intervals are not ordered"
        );
    }

    #[test]
    fn year_months() {
        let ym = YearMonth::parse("2015-06").unwrap();
        assert_eq!((ym.year(), ym.month()), (2015, 6));
        assert_eq!(ym.to_string(), "2015-06");
        for bad in ["2015", "2015-6", "2015-00", "2015-06-01", ""] {
            assert!(YearMonth::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn display_round_trips(y in 1880i32..2100, m in 1u32..=12, day in 1u32..=31, precision in 0u8..3) {
            let text = match precision {
                0 => format!("{y:04}"),
                1 => format!("{y:04}-{m:02}"),
                _ => format!("{y:04}-{m:02}-{day:02}"),
            };
            if let Ok(p) = PartialDate::parse(&text) {
                prop_assert_eq!(p.to_string(), text);
                prop_assert!(p.earliest() <= p.midpoint() && p.midpoint() <= p.latest());
            }
        }

        #[test]
        fn never_panics(s in "\\PC{0,16}") {
            let _ = PartialDate::parse(&s);
            let _ = YearMonth::parse(&s);
        }
    }
}
