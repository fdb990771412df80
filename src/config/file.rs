//! Configuration files: a [`Config`] as TOML or JSON. The file is the struct: every key is
//! optional and defaults to [`Config::default`], an unknown key is refused with its name, and
//! the values are checked by [`Config::validate`].

use std::path::Path;

use serde::de::DeserializeOwned;

use super::Config;
use crate::error::{Error, Result};

impl Config {
    /// Parses and validates a TOML configuration (see the README's "Configuration" for a
    /// complete file).
    ///
    /// # Errors
    ///
    /// [`Error::ConfigFile`] for malformed TOML, an unknown key, or a value of the wrong type
    /// (a duration that does not parse, ...), naming the key and its line; [`Error::Config`]
    /// for a value out of range.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use apalis_pgmq_notify::Config;
    ///
    /// let config = Config::from_toml(r#"
    ///     [leases]
    ///     visibility_timeout = "2m"
    ///
    ///     [retention]
    ///     archive = "forever"
    /// "#)?;
    /// assert_eq!(config.leases.visibility_timeout, Duration::from_secs(120));
    /// assert_eq!(config.retention.archive, None);
    /// # Ok::<(), apalis_pgmq_notify::Error>(())
    /// ```
    pub fn from_toml(text: &str) -> Result<Self> {
        parse_toml(text, None)
    }

    /// Parses and validates a JSON configuration: the same keys as TOML.
    ///
    /// # Errors
    ///
    /// As [`Config::from_toml`].
    ///
    /// # Example
    ///
    /// ```
    /// use apalis_pgmq_notify::Config;
    ///
    /// let config = Config::from_json(r#"{"retries": {"max_attempts": 3}}"#)?;
    /// assert_eq!(config.retries.max_attempts, 3);
    /// # Ok::<(), apalis_pgmq_notify::Error>(())
    /// ```
    pub fn from_json(text: &str) -> Result<Self> {
        parse_json(text, None)
    }

    /// Reads, parses and validates a configuration file: TOML if its name ends in `.toml`,
    /// JSON if in `.json`.
    ///
    /// # Errors
    ///
    /// [`Error::ConfigFile`] if the file cannot be read, has another extension, or does not
    /// parse (naming the key and its line); [`Error::Config`] for a value out of range.
    ///
    /// # Example
    ///
    /// ```no_run
    /// let config = apalis_pgmq_notify::Config::load("apalis.toml")?;
    /// # Ok::<(), apalis_pgmq_notify::Error>(())
    /// ```
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let failed = |message: String| Error::ConfigFile {
            path: Some(shown.clone()),
            line: None,
            column: None,
            message,
        };
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let toml = match ext.as_deref() {
            Some("toml") => true,
            Some("json") => false,
            _ => {
                return Err(failed(
                    "the file name must end in .toml or .json (that decides its format)".to_owned(),
                ));
            }
        };
        let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
        if toml {
            parse_toml(&text, Some(&shown))
        } else {
            parse_json(&text, Some(&shown))
        }
    }

    /// This configuration as a TOML file, every setting written out: what
    /// [`Config::from_toml`] reads back to an equal value.
    ///
    /// # Example
    ///
    /// ```
    /// use apalis_pgmq_notify::Config;
    ///
    /// let text = Config::default().to_toml();
    /// assert!(text.contains("visibility_timeout = \"30s\""));
    /// assert_eq!(Config::from_toml(&text)?, Config::default());
    /// # Ok::<(), apalis_pgmq_notify::Error>(())
    /// ```
    #[must_use]
    pub fn to_toml(&self) -> String {
        // Every field is a table, a string, a number or a boolean: nothing TOML cannot write.
        toml::to_string(self).unwrap_or_default()
    }
}

fn parse_toml(text: &str, path: Option<&str>) -> Result<Config> {
    let parsed: std::result::Result<Config, _> =
        serde_path_to_error::deserialize(toml::Deserializer::new(text));
    let config = parsed.map_err(|e| {
        let key = key_of(e.path());
        let inner = e.into_inner();
        let (line, column) = inner
            .span()
            .map_or((None, None), |s| line_column(text, s.start));
        let message: Vec<&str> = inner.message().lines().map(str::trim).collect();
        file_error(path, line, column, key, &message.join("; "))
    })?;
    config.validate()?;
    Ok(config)
}

fn parse_json(text: &str, path: Option<&str>) -> Result<Config> {
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed: std::result::Result<Config, _> = deserialize_all(&mut de);
    let config = parsed.map_err(|(key, e)| {
        let (line, column) = (e.line() > 0).then(|| (e.line(), e.column())).unzip();
        // serde_json appends " at line L column C"; the location is reported on its own.
        let text = e.to_string();
        let message = text
            .strip_suffix(&format!(" at line {} column {}", e.line(), e.column()))
            .unwrap_or(&text);
        file_error(path, line, column, key, message)
    })?;
    config.validate()?;
    Ok(config)
}

/// Deserializes one JSON document and checks nothing follows it.
fn deserialize_all<T: DeserializeOwned>(
    de: &mut serde_json::Deserializer<serde_json::de::StrRead<'_>>,
) -> std::result::Result<T, (Option<String>, serde_json::Error)> {
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let key = key_of(e.path());
        (key, e.into_inner())
    })?;
    de.end().map_err(|e| (None, e))?;
    Ok(value)
}

/// The dotted key of a value, or `None` at the top of the file.
fn key_of(path: &serde_path_to_error::Path) -> Option<String> {
    let key = path.to_string();
    (key != "." && !key.is_empty()).then_some(key)
}

fn file_error(
    path: Option<&str>,
    line: Option<usize>,
    column: Option<usize>,
    key: Option<String>,
    message: &str,
) -> Error {
    Error::ConfigFile {
        path: path.map(str::to_owned),
        line,
        column,
        message: match key {
            Some(key) => format!("{key}: {message}"),
            None => message.to_owned(),
        },
    }
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (Option<usize>, Option<usize>) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (Some(line), Some(column))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        config::{DoneAction, ExhaustedAction, KilledAction},
        notify::NotifyMode,
    };

    #[test]
    fn the_default_round_trips_through_toml_and_json() {
        let text = Config::default().to_toml();
        assert_eq!(Config::from_toml(&text).expect("toml"), Config::default());
        let json = serde_json::to_string_pretty(&Config::default()).expect("json");
        assert_eq!(Config::from_json(&json).expect("json"), Config::default());
        assert_eq!(Config::from_toml("").expect("empty"), Config::default());
        assert_eq!(Config::from_json("{}").expect("empty"), Config::default());
    }

    /// Every setting changed from its default, once in TOML and once in JSON.
    #[test]
    fn every_setting_is_settable_from_toml_and_json() {
        let toml = r#"
            [leases]
            visibility_timeout = "2m"
            [claims]
            batch_size = 10
            max_batch_size = 50
            adaptive = false
            priorities = true
            floor_sweep = "off"
            recover_lost = false
            [wakeups]
            listen = false
            mode = { message = { max_payload_bytes = 4000 } }
            channels = { prefix = "app.", namespace_pattern = "(?P<namespace>[a-z]+)_jobs", default_namespace = "misc" }
            poll_interval = "5s"
            poll_jitter = 0.25
            linger = "0s"
            [retries]
            max_attempts = 3
            defer_delay = "250ms"
            backoff = { base = "500ms", factor = 3.0, max = "10m", jitter = 0.0 }
            [outcomes]
            on_done = "delete"
            on_killed = "dead_letter"
            on_exhausted = "archive"
            batch_size = 100
            flush_interval = "1ms"
            [pushes]
            max_payload_bytes = 4096
            idempotency_window = "1h"
            [retention]
            archive = "2d"
            dead_letters = "forever"
            [results]
            store = true
            retention = "forever"
            [process]
            heartbeat_interval = "5s"
            listener_health_check = "3s"
            [metrics]
            kind = "report"
        "#;
        let json = r#"{
            "leases": {"visibility_timeout": "2m"},
            "claims": {"batch_size": 10, "max_batch_size": 50, "adaptive": false, "priorities": true,
                       "floor_sweep": "off", "recover_lost": false},
            "wakeups": {"listen": false, "mode": {"message": {"max_payload_bytes": 4000}},
                        "channels": {"prefix": "app.", "namespace_pattern": "(?P<namespace>[a-z]+)_jobs",
                                     "default_namespace": "misc"},
                        "poll_interval": "5s", "poll_jitter": 0.25, "linger": "0s"},
            "retries": {"max_attempts": 3, "defer_delay": "250ms",
                        "backoff": {"base": "500ms", "factor": 3.0, "max": "10m", "jitter": 0.0}},
            "outcomes": {"on_done": "delete", "on_killed": "dead_letter", "on_exhausted": "archive",
                         "batch_size": 100, "flush_interval": "1ms"},
            "pushes": {"max_payload_bytes": 4096, "idempotency_window": "1h"},
            "retention": {"archive": "2d", "dead_letters": "forever"},
            "results": {"store": true, "retention": "forever"},
            "process": {"heartbeat_interval": "5s", "listener_health_check": "3s"},
            "metrics": {"kind": "report"}
        }"#;
        let channels = crate::notify::NotifyChannels::with_prefix("app.")
            .and_then(|c| c.namespace_pattern("(?P<namespace>[a-z]+)_jobs", "misc"))
            .expect("channels");
        let expected = Config::default()
            .visibility_timeout(Duration::from_secs(120))
            .fetch_batch_size(10)
            .max_fetch_batch_size(50)
            .adaptive_claims(false)
            .priorities(true)
            .claim_floor_sweep(None)
            .recover_lost_claims(false)
            .listen(false)
            .notify_mode(NotifyMode::Message {
                max_payload_bytes: 4000,
            })
            .notify_channels(channels)
            .poll_interval(Duration::from_secs(5))
            .poll_jitter(0.25)
            .linger(Duration::ZERO)
            .max_attempts(3)
            .defer_delay(Duration::from_millis(250))
            .backoff(
                crate::config::Backoff::default()
                    .base(Duration::from_millis(500))
                    .factor(3.0)
                    .max(Duration::from_secs(600))
                    .jitter(0.0),
            )
            .on_done(DoneAction::Delete)
            .on_killed(KilledAction::DeadLetter)
            .on_exhausted(ExhaustedAction::Archive)
            .completion_batch_size(100)
            .completion_flush_interval(Duration::from_millis(1))
            .max_payload_bytes(4096)
            .idempotency_window(Some(Duration::from_secs(3600)))
            .archive_retention(Some(Duration::from_secs(2 * 86_400)))
            .dead_letter_retention(None)
            .store_results(true)
            .result_retention(None)
            .heartbeat_interval(Duration::from_secs(5))
            .listener_health_check(Duration::from_secs(3))
            .metrics_kind("report");
        // Every setting differs from its default: a key the parser ignored would show.
        let defaults = Config::default().settings();
        for (key, value) in expected.settings() {
            let default = defaults.iter().find(|(k, _)| *k == key).map(|(_, v)| v);
            assert_ne!(
                default,
                Some(&value),
                "{key} is not changed by the test file"
            );
        }
        assert_eq!(Config::from_toml(toml).expect("toml"), expected);
        assert_eq!(Config::from_json(json).expect("json"), expected);
        // And the changed configuration round-trips too.
        assert_eq!(
            Config::from_toml(&expected.to_toml()).expect("again"),
            expected
        );
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_name() {
        for (text, json) in [
            ("max_atempts = 3", false),
            ("[retries]\nmax_atempts = 3", false),
            (r#"{"retries": {"max_atempts": 3}}"#, true),
            ("[retries.backoff]\nmax_atempts = 3", false),
        ] {
            let err = if json {
                Config::from_json(text)
            } else {
                Config::from_toml(text)
            }
            .expect_err(text);
            let shown = err.to_string();
            assert!(matches!(err, Error::ConfigFile { .. }), "{shown}");
            assert!(
                shown.contains("unknown field `max_atempts`"),
                "{text}: {shown}"
            );
            assert!(!shown.contains("at line"), "{shown}");
        }
    }

    #[test]
    fn a_bad_value_names_its_key_and_line() {
        let err = Config::from_toml(
            "[retries]\nmax_attempts = 3\n\n[retries.backoff]\nbase = \"soon\"\n",
        )
        .expect_err("bad duration");
        match &err {
            Error::ConfigFile { line, message, .. } => {
                assert_eq!(*line, Some(5), "{err}");
                assert!(message.starts_with("retries.backoff.base: "), "{err}");
                assert!(message.contains("invalid duration \"soon\""), "{err}");
            }
            other => panic!("{other}"),
        }
        let err = Config::from_json("{\n \"leases\": {\"visibility_timeout\": 30}\n}")
            .expect_err("a number is not a duration");
        match &err {
            Error::ConfigFile { line, message, .. } => {
                assert_eq!(*line, Some(2), "{err}");
                assert!(message.starts_with("leases.visibility_timeout: "), "{err}");
                assert!(message.contains("\"30s\""), "{err}");
            }
            other => panic!("{other}"),
        }
        for (text, needle) in [
            ("[outcomes]\non_done = \"keep\"", "unknown variant `keep`"),
            ("[wakeups]\nmode = \"per_row\"", "per_row"),
            ("[wakeups.channels]\nprefix = \"x'y\"", "prefix"),
            (
                "[wakeups]\nmode = { message = { max_payload_bytes = 9000 } }",
                "7999",
            ),
            ("[retention]\narchive = \"never\"", "\"forever\""),
            ("[leases\n", "invalid table header; expected"),
        ] {
            let err = Config::from_toml(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(!err.contains("at line"), "{err}");
        }
        // In range for the parser, out of range for the backend: named by its key.
        let err = Config::from_toml("[leases]\nvisibility_timeout = \"10ms\"").expect_err("range");
        assert!(
            matches!(&err, Error::Config { setting, .. } if setting == "leases.visibility_timeout"),
            "{err}"
        );
    }

    #[test]
    fn load_picks_the_format_by_extension() {
        let dir = std::env::temp_dir().join(format!("apq-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let toml = dir.join("a.toml");
        std::fs::write(&toml, "[retries]\nmax_attempts = 4\n").expect("write");
        assert_eq!(Config::load(&toml).expect("toml").retries.max_attempts, 4);
        let json = dir.join("a.json");
        std::fs::write(&json, r#"{"retries": {"max_attempts": 4}}"#).expect("write");
        assert_eq!(Config::load(&json).expect("json").retries.max_attempts, 4);
        let other = dir.join("a.yaml");
        std::fs::write(&other, "").expect("write");
        let err = Config::load(&other).expect_err("yaml").to_string();
        assert!(err.contains(".toml or .json"), "{err}");
        let err = Config::load(dir.join("missing.toml"))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
