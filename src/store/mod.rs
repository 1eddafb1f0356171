//! The orchestration store: jobs, calendar events and occurrences, hook runs, intents, leases
//! and catalog images (docs/orchestration.md, section 1.2).
//!
//! This module starts with the small value types every orchestration layer names: the ids of
//! jobs, images and events, the backup day and the priority.

use std::fmt;

use jiff::civil::Date;

/// Why a value type could not be built from its text or number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A priority outside 0..=99.
    #[error("priority {0} is out of range (0 = always executed, 1 lowest .. 99 highest)")]
    Priority(i64),
    /// An id that is not its letter followed by a number (`j42`, `i17`, `e3`).
    #[error("{what} id {text:?} is not {prefix} followed by a number")]
    Id {
        /// Which id ("job", "image", "event").
        what: &'static str,
        /// Its letter.
        prefix: char,
        /// The text given.
        text: String,
    },
    /// A backup day that is not `YYYYMMDD` or `YYYY-MM-DD`.
    #[error("backup day {0:?} is not YYYYMMDD or YYYY-MM-DD")]
    BackupDay(String),
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $what:literal) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize,
            serde::Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = ValueError;
            fn from_str(s: &str) -> Result<Self, ValueError> {
                let digits = s.strip_prefix($prefix).unwrap_or(s);
                digits.parse().map($name).map_err(|_| ValueError::Id {
                    what: $what,
                    prefix: $prefix,
                    text: s.to_string(),
                })
            }
        }
    };
}

id_type!(
    /// A job (`j42`): one run of a plan, a restore, a command or maintenance, with its attempts.
    JobId,
    'j',
    "job"
);
id_type!(
    /// A catalog image (`i17`): one time-zero copy recorded at its cut.
    ImageId,
    'i',
    "image"
);
id_type!(
    /// A calendar event (`e3`): what starts, on which schedule, at which priority.
    EventId,
    'e',
    "event"
);

/// A job's or event's priority: 1 (lowest) to 99 (highest); 0 means always executed, never
/// suppressed and suppressing nothing.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "i64", into = "u8")]
pub struct Priority(u8);

impl Priority {
    /// Always executed: never suppressed, suppresses nothing.
    pub const ALWAYS: Priority = Priority(0);

    /// A priority from a number; anything outside 0..=99 is refused.
    ///
    /// # Errors
    /// [`ValueError::Priority`] outside 0..=99.
    pub fn new(n: i64) -> Result<Priority, ValueError> {
        match u8::try_from(n) {
            Ok(p) if i64::from(p) <= i64::from(crate::limits::PRIORITY_MAX) => Ok(Priority(p)),
            _ => Err(ValueError::Priority(n)),
        }
    }

    /// The number, 0..=99.
    #[must_use]
    pub fn get(self) -> u8 {
        self.0
    }

    /// Whether this is priority 0 (always executed).
    #[must_use]
    pub fn is_always(self) -> bool {
        self.0 == 0
    }
}

impl TryFrom<i64> for Priority {
    type Error = ValueError;
    fn try_from(n: i64) -> Result<Priority, ValueError> {
        Priority::new(n)
    }
}

impl From<Priority> for u8 {
    fn from(p: Priority) -> u8 {
        p.0
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for Priority {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Priority, ValueError> {
        let n: i64 = s.trim().parse().map_err(|_| ValueError::Priority(-1))?;
        Priority::new(n)
    }
}

/// A backup day: the civil date of the last NEWDAY occurrence at or before an instant. Jobs,
/// log lines and target names carry it as `YYYYMMDD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackupDay(pub Date);

impl fmt::Display for BackupDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}{:02}{:02}",
            self.0.year(),
            self.0.month(),
            self.0.day()
        )
    }
}

impl std::str::FromStr for BackupDay {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<BackupDay, ValueError> {
        let bad = || ValueError::BackupDay(s.to_string());
        if s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()) {
            let y: i16 = s[..4].parse().map_err(|_| bad())?;
            let m: i8 = s[4..6].parse().map_err(|_| bad())?;
            let d: i8 = s[6..].parse().map_err(|_| bad())?;
            return Date::new(y, m, d).map(BackupDay).map_err(|_| bad());
        }
        s.parse::<Date>().map(BackupDay).map_err(|_| bad())
    }
}

impl serde::Serialize for BackupDay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BackupDay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BackupDay, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_parse_with_their_letter() {
        assert_eq!(JobId(42).to_string(), "j42");
        assert_eq!("j42".parse::<JobId>().unwrap(), JobId(42));
        assert_eq!("17".parse::<ImageId>().unwrap(), ImageId(17));
        assert!("x3".parse::<EventId>().is_err());
    }

    #[test]
    fn priorities_outside_0_to_99_are_refused() {
        assert!(Priority::new(0).unwrap().is_always());
        assert_eq!(Priority::new(99).unwrap().get(), 99);
        assert_eq!(Priority::new(100), Err(ValueError::Priority(100)));
        assert_eq!(Priority::new(-1), Err(ValueError::Priority(-1)));
        assert!("abc".parse::<Priority>().is_err());
    }

    #[test]
    fn backup_day_prints_as_yyyymmdd_and_parses_both_forms() {
        let d: BackupDay = "20070910".parse().unwrap();
        assert_eq!(d.to_string(), "20070910");
        assert_eq!("2007-09-10".parse::<BackupDay>().unwrap(), d);
        assert!("20070931".parse::<BackupDay>().is_err());
        assert!("2007091".parse::<BackupDay>().is_err());
    }
}
