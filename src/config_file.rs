//! A JSON configuration file for a storage: the queue plus every [`Config`] value.

use std::time::Duration;

use serde::Deserialize;

use crate::{
    config::{Backoff, Config, DoneAction, ExhaustedAction, KilledAction},
    error::{Error, Result},
    notify::{NotifyChannels, NotifyMode},
    queue::QueueName,
};

/// A storage configuration read from JSON. Unknown keys are errors, so a typo is caught.
///
/// ```json
/// {
///   "queue": "email",
///   "visibility_timeout_secs": 30,
///   "fetch_batch_size": 100,
///   "max_fetch_batch_size": 1000,
///   "adaptive_claims": true,
///   "poll_interval_ms": 30000,
///   "max_attempts": 25,
///   "backoff": { "base_ms": 1000, "factor": 2.0, "max_ms": 3600000, "jitter": 0.2 },
///   "on_done": "archive",
///   "on_killed": "delete",
///   "on_exhausted": "dead_letter",
///   "listen": true,
///   "priorities": false,
///   "store_results": false,
///   "result_retention_secs": 86400,
///   "notify": { "prefix": "apq.", "namespace_pattern": "(?P<namespace>\\w+)_queue",
///               "default_namespace": "default", "mode": "batch" }
/// }
/// ```
///
/// Every key but `queue` is optional and defaults to [`Config::default`].
///
/// # Example
///
/// ```
/// use apalis_pgmq_notify::ConfigFile;
///
/// let file = ConfigFile::from_json(r#"{"queue": "email", "max_attempts": 3}"#)?;
/// assert_eq!(file.queue.as_str(), "email");
/// assert_eq!(file.config.get_max_attempts(), 3);
/// # Ok::<(), apalis_pgmq_notify::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// The queue.
    pub queue: QueueName,
    /// The validated configuration.
    pub config: Config,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    queue: String,
    visibility_timeout_secs: Option<f64>,
    fetch_batch_size: Option<usize>,
    max_fetch_batch_size: Option<usize>,
    adaptive_claims: Option<bool>,
    poll_interval_ms: Option<u64>,
    poll_jitter: Option<f64>,
    max_attempts: Option<u32>,
    backoff: Option<RawBackoff>,
    on_done: Option<RawDone>,
    on_killed: Option<RawKilled>,
    on_exhausted: Option<RawExhausted>,
    completion_batch_size: Option<usize>,
    completion_flush_interval_ms: Option<u64>,
    max_payload_bytes: Option<usize>,
    listen: Option<bool>,
    linger_ms: Option<u64>,
    priorities: Option<bool>,
    store_results: Option<bool>,
    result_retention_secs: Option<f64>,
    notify: Option<RawNotify>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    base_ms: Option<u64>,
    factor: Option<f64>,
    max_ms: Option<u64>,
    jitter: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawDone {
    Archive,
    Delete,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawKilled {
    Delete,
    Archive,
    DeadLetter,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawExhausted {
    DeadLetter,
    Archive,
    Delete,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    prefix: Option<String>,
    namespace_pattern: Option<String>,
    default_namespace: Option<String>,
    mode: Option<String>,
    max_payload_bytes: Option<u16>,
}

fn secs(what: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v).map_err(|_| {
        Error::Config(format!(
            "{what} must be a non-negative number of seconds, got {v}"
        ))
    })
}

impl ConfigFile {
    /// Parses and validates a configuration.
    ///
    /// # Errors
    ///
    /// [`Error::Json`] for malformed JSON, unknown keys or wrong types; [`Error::InvalidQueueName`];
    /// [`Error::Config`] for values out of range.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: Raw = serde_json::from_str(text)?;
        let queue = QueueName::new(&raw.queue)?;
        let mut c = Config::default();
        if let Some(v) = raw.visibility_timeout_secs {
            c = c.visibility_timeout(secs("visibility_timeout_secs", v)?);
        }
        if let Some(v) = raw.fetch_batch_size {
            c = c.fetch_batch_size(v);
        }
        if let Some(v) = raw.max_fetch_batch_size {
            c = c.max_fetch_batch_size(v);
        }
        if let Some(v) = raw.adaptive_claims {
            c = c.adaptive_claims(v);
        }
        if let Some(v) = raw.poll_interval_ms {
            c = c.poll_interval(Duration::from_millis(v));
        }
        if let Some(v) = raw.poll_jitter {
            c = c.poll_jitter(v);
        }
        if let Some(v) = raw.max_attempts {
            c = c.max_attempts(v);
        }
        if let Some(b) = raw.backoff {
            let mut backoff = Backoff::default();
            if let Some(v) = b.base_ms {
                backoff = backoff.base(Duration::from_millis(v));
            }
            if let Some(v) = b.factor {
                backoff = backoff.factor(v);
            }
            if let Some(v) = b.max_ms {
                backoff = backoff.max(Duration::from_millis(v));
            }
            if let Some(v) = b.jitter {
                backoff = backoff.jitter(v);
            }
            c = c.backoff(backoff);
        }
        if let Some(v) = raw.on_done {
            c = c.on_done(match v {
                RawDone::Archive => DoneAction::Archive,
                RawDone::Delete => DoneAction::Delete,
            });
        }
        if let Some(v) = raw.on_killed {
            c = c.on_killed(match v {
                RawKilled::Delete => KilledAction::Delete,
                RawKilled::Archive => KilledAction::Archive,
                RawKilled::DeadLetter => KilledAction::DeadLetter,
            });
        }
        if let Some(v) = raw.on_exhausted {
            c = c.on_exhausted(match v {
                RawExhausted::DeadLetter => ExhaustedAction::DeadLetter,
                RawExhausted::Archive => ExhaustedAction::Archive,
                RawExhausted::Delete => ExhaustedAction::Delete,
            });
        }
        if let Some(v) = raw.completion_batch_size {
            c = c.completion_batch_size(v);
        }
        if let Some(v) = raw.completion_flush_interval_ms {
            c = c.completion_flush_interval(Duration::from_millis(v));
        }
        if let Some(v) = raw.max_payload_bytes {
            c = c.max_payload_bytes(v);
        }
        if let Some(v) = raw.listen {
            c = c.listen(v);
        }
        if let Some(v) = raw.linger_ms {
            c = c.linger(Duration::from_millis(v));
        }
        if let Some(v) = raw.priorities {
            c = c.priorities(v);
        }
        if let Some(v) = raw.store_results {
            c = c.store_results(v);
        }
        if let Some(v) = raw.result_retention_secs {
            c = c.result_retention(Some(secs("result_retention_secs", v)?));
        }
        if let Some(n) = raw.notify {
            let mut channels = match &n.prefix {
                Some(p) => NotifyChannels::with_prefix(p)?,
                None => NotifyChannels::default(),
            };
            if n.namespace_pattern.is_some() || n.default_namespace.is_some() {
                channels = channels.namespace_pattern(
                    n.namespace_pattern
                        .as_deref()
                        .unwrap_or(crate::notify::DEFAULT_NAMESPACE_PATTERN),
                    n.default_namespace
                        .as_deref()
                        .unwrap_or(crate::notify::DEFAULT_NAMESPACE),
                )?;
            }
            let mode = NotifyMode::from_name(n.mode.as_deref(), n.max_payload_bytes)?;
            c = c.notify_channels(channels).notify_mode(mode);
        }
        c.validate()?;
        Ok(Self { queue, config: c })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses() {
        let f = ConfigFile::from_json(
            r#"{"queue": "billing_queue", "visibility_timeout_secs": 60, "fetch_batch_size": 10,
                "poll_interval_ms": 5000, "max_attempts": 3,
                "backoff": {"base_ms": 500, "factor": 3, "max_ms": 60000, "jitter": 0},
                "on_done": "delete", "on_killed": "dead_letter", "on_exhausted": "archive",
                "listen": true, "priorities": true, "store_results": true,
                "result_retention_secs": 3600,
                "notify": {"prefix": "app.", "mode": "message", "max_payload_bytes": 4000}}"#,
        )
        .expect("valid");
        assert!(f.config.priorities && f.config.store_results);
        assert_eq!(f.config.result_retention, Some(Duration::from_secs(3600)));
        assert_eq!(f.queue.as_str(), "billing_queue");
        assert_eq!(f.config.get_visibility_timeout(), Duration::from_secs(60));
        assert_eq!(f.config.get_max_attempts(), 3);
        assert_eq!(
            f.config.notify_mode,
            NotifyMode::Message {
                max_payload_bytes: 4000
            }
        );
    }

    #[test]
    fn a_notify_section_without_a_mode_keeps_the_default_mode() {
        let f = ConfigFile::from_json(r#"{"queue": "q", "notify": {"prefix": "app."}}"#)
            .expect("valid");
        assert_eq!(f.config.notify_mode, NotifyMode::OnDemand);
        assert_eq!(f.config.notify_mode, Config::default().notify_mode);
        let f = ConfigFile::from_json(r#"{"queue": "q", "notify": {"max_payload_bytes": 3000}}"#)
            .expect("valid");
        assert_eq!(
            f.config.notify_mode,
            NotifyMode::Message {
                max_payload_bytes: 3000
            }
        );
    }

    #[test]
    fn mistakes_are_reported() {
        for (text, needle) in [
            (r#"{"queue": "Bad Name"}"#, "invalid queue name"),
            (r#"{"queue": "q", "max_atempts": 3}"#, "unknown field"),
            (r#"{"queue": "q", "max_attempts": 0}"#, "max_attempts"),
            (r#"{"queue": "q", "on_done": "keep"}"#, "unknown variant"),
            (r#"{"queue": "q", "notify": {"prefix": "x'y"}}"#, "prefix"),
            (
                r#"{"queue": "q", "notify": {"mode": "message", "max_payload_bytes": 9000}}"#,
                "7999",
            ),
            (
                r#"{"queue": "q", "visibility_timeout_secs": -1}"#,
                "visibility_timeout_secs",
            ),
            (
                r#"{"queue": "q", "visibility_timeout_secs": 1e13}"#,
                "visibility_timeout must be within",
            ),
            (
                r#"{"queue": "q", "poll_interval_ms": 100000000000}"#,
                "poll_interval must be at most",
            ),
            ("not json", "expected"),
        ] {
            let err = ConfigFile::from_json(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
