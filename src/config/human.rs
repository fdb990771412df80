//! Durations as people write them: `"30s"`, `"500ms"`, `"7d"`, `"1h 30m"`, in configuration
//! files and on the command line; and the serde adapters of [`Config`](crate::Config)'s
//! durations.
//!
//! Parsing is `humantime`'s (units `ns`, `us`, `ms`, `s`, `m`, `h`, `d`, `w`, and their long
//! names). Formatting is this module's: whole days, hours, minutes, seconds, milliseconds,
//! microseconds and nanoseconds, largest first (`"7d"`, `"1h 30m"`, `"1s 500ms"`), which
//! parses back to the same value.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A [`Duration`] that reads and prints as people write it: `"30s"`, `"500ms"`, `"7d"`,
/// `"1h 30m"`. The form of every duration in a configuration file; formatting then parsing
/// gives the same value back.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use apalis_pgmq_notify::HumanDuration;
///
/// let d: HumanDuration = "1h 30m".parse()?;
/// assert_eq!(d.0, Duration::from_secs(5400));
/// assert_eq!(HumanDuration(Duration::from_secs(7 * 86_400)).to_string(), "7d");
/// assert_eq!(HumanDuration(Duration::from_millis(1500)).to_string(), "1s 500ms");
/// # Ok::<(), String>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

impl From<Duration> for HumanDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Self {
        d.0
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u128); 7] = [
            ("d", 86_400_000_000_000),
            ("h", 3_600_000_000_000),
            ("m", 60_000_000_000),
            ("s", 1_000_000_000),
            ("ms", 1_000_000),
            ("us", 1_000),
            ("ns", 1),
        ];
        let mut rest = self.0.as_nanos();
        if rest == 0 {
            return f.write_str("0s");
        }
        let mut first = true;
        for (unit, nanos) in UNITS {
            let n = rest / nanos;
            if n > 0 {
                if !first {
                    f.write_str(" ")?;
                }
                write!(f, "{n}{unit}")?;
                first = false;
                rest %= nanos;
            }
        }
        Ok(())
    }
}

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s.trim()).map(Self).map_err(|e| {
            format!(
                "invalid duration {s:?}: {e} (write e.g. \"30s\", \"500ms\", \"7d\", \"1h 30m\")"
            )
        })
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurationVisitor { none: None })
            .and_then(|v| v.ok_or_else(|| de::Error::custom("a duration is required here")))
            .map(Self)
    }
}

/// Reads a duration string; with `none`, that word stands for `None`.
struct DurationVisitor {
    none: Option<&'static str>,
}

impl de::Visitor<'_> for DurationVisitor {
    type Value = Option<Duration>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.none {
            Some(word) => write!(f, "a duration such as \"30s\", \"7d\", or \"{word}\""),
            None => f.write_str("a duration such as \"30s\", \"500ms\", \"7d\""),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if self.none.is_some_and(|word| v.trim() == word) {
            return Ok(None);
        }
        v.parse::<HumanDuration>()
            .map(|d| Some(d.0))
            .map_err(|e| match self.none {
                Some(word) => E::custom(format!("{e}, or {word:?}")),
                None => E::custom(e),
            })
    }
}

/// `Duration` fields as human durations.
pub(crate) mod duration {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        HumanDuration(*d).serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        HumanDuration::deserialize(d).map(|h| h.0)
    }
}

/// `Option<Duration>` fields where `None` keeps things for ever: `"forever"`.
pub(crate) mod or_forever {
    use super::*;

    pub(crate) const WORD: &str = "forever";

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => HumanDuration(*d).serialize(s),
            None => s.serialize_str(WORD),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        d.deserialize_any(DurationVisitor { none: Some(WORD) })
    }
}

/// `Option<Duration>` fields where `None` turns the feature off: `"off"`.
pub(crate) mod or_off {
    use super::*;

    pub(crate) const WORD: &str = "off";

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => HumanDuration(*d).serialize(s),
            None => s.serialize_str(WORD),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        d.deserialize_any(DurationVisitor { none: Some(WORD) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_largest_units_first_and_parses_back() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(5), "5ms"),
            (Duration::from_millis(1500), "1s 500ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(5400), "1h 30m"),
            (Duration::from_secs(7 * 86_400), "7d"),
            (Duration::from_secs(365 * 86_400), "365d"),
            (Duration::new(1, 1), "1s 1ns"),
        ] {
            assert_eq!(HumanDuration(d).to_string(), text);
            assert_eq!(
                text.parse::<HumanDuration>(),
                Ok(HumanDuration(d)),
                "{text}"
            );
        }
        let odd = Duration::new(123_456, 789_012_345);
        let shown = HumanDuration(odd).to_string();
        assert_eq!(
            shown.parse::<HumanDuration>().map(|h| h.0),
            Ok(odd),
            "{shown}"
        );
    }

    #[test]
    fn bad_durations_say_how_to_write_one() {
        for bad in ["soon", "30", "-1s", ""] {
            let err = bad.parse::<HumanDuration>().expect_err(bad);
            assert!(
                err.contains("invalid duration") && err.contains("\"30s\""),
                "{err}"
            );
        }
    }
}
