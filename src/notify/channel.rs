//! Notification channel names.

use regex::Regex;

use crate::{
    error::{Error, Result},
    queue::{MAX_QUEUE_NAME_LEN, QueueName},
};

/// PostgreSQL's identifier limit, which applies to channel names.
pub const MAX_CHANNEL_LEN: usize = 63;

/// Longest channel prefix: `<prefix>ns.<namespace>` must fit 63 bytes for any queue name.
pub const MAX_PREFIX_LEN: usize = MAX_CHANNEL_LEN - MAX_QUEUE_NAME_LEN - 3;

/// The default namespace pattern: `billing_queue` is in namespace `billing`.
pub const DEFAULT_NAMESPACE_PATTERN: &str = r"(?P<namespace>\w+)_queue";

/// The namespace of queues the pattern does not match.
pub const DEFAULT_NAMESPACE: &str = "default";

/// How notification channels are named.
///
/// - queue channel: `<prefix>q.<queue>` — every event of one queue;
/// - namespace channel: `<prefix>ns.<namespace>` — every event of the queues in a namespace, where
///   the namespace is the `namespace` capture of a pattern applied to the queue name
///   (default [`DEFAULT_NAMESPACE_PATTERN`]), or [`DEFAULT_NAMESPACE`] when it does not match;
/// - queue-created channel: `<prefix>created`;
/// - results channel: `<prefix>r.<queue>` — jobs of one queue whose results were stored.
///
/// The prefix (default `apq.`) is at most [`MAX_PREFIX_LEN`] bytes of `[a-z0-9_.]`, so every
/// channel fits PostgreSQL's 63 bytes.
///
/// # Example
///
/// ```
/// use apalis_pgmq_notify::{NotifyChannels, QueueName};
///
/// let channels = NotifyChannels::default();
/// let q = QueueName::new("billing_queue")?;
/// assert_eq!(channels.queue_channel(&q), "apq.q.billing_queue");
/// assert_eq!(channels.namespace(&q), "billing");
/// assert_eq!(channels.namespace_channel("billing"), "apq.ns.billing");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct NotifyChannels {
    prefix: String,
    pattern: Regex,
    default_namespace: String,
}

impl PartialEq for NotifyChannels {
    fn eq(&self, other: &Self) -> bool {
        self.prefix == other.prefix
            && self.pattern.as_str() == other.pattern.as_str()
            && self.default_namespace == other.default_namespace
    }
}

impl Default for NotifyChannels {
    fn default() -> Self {
        Self {
            prefix: "apq.".to_owned(),
            // The default pattern is a literal known to compile.
            pattern: Regex::new(DEFAULT_NAMESPACE_PATTERN).unwrap_or_else(|_| unreachable!()),
            default_namespace: DEFAULT_NAMESPACE.to_owned(),
        }
    }
}

/// Checks one part of a channel name: 1 to `max` bytes of `[a-z0-9_.]`.
pub(crate) fn check_part(what: &str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() || value.len() > max {
        return Err(Error::config(
            what,
            format!("{value:?} must be 1 to {max} bytes"),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '.'))
    {
        return Err(Error::config(
            what,
            format!("{value:?} has {c:?}; use lower-case ASCII letters, digits, '_' and '.'"),
        ));
    }
    Ok(())
}

impl NotifyChannels {
    /// Channels with this prefix and the default pattern.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if the prefix is empty, longer than [`MAX_PREFIX_LEN`] bytes, or has a
    /// character outside `[a-z0-9_.]`.
    pub fn with_prefix(prefix: &str) -> Result<Self> {
        check_part("channel prefix", prefix, MAX_PREFIX_LEN)?;
        Ok(Self {
            prefix: prefix.to_owned(),
            ..Self::default()
        })
    }

    /// Sets the namespace pattern (a Rust regex with a `namespace` capture group) and the default
    /// namespace for queues it does not match.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if the pattern does not compile, lacks a `namespace` group, or the
    /// default namespace is not 1 to 43 bytes of `[a-z0-9_.]`.
    pub fn namespace_pattern(mut self, pattern: &str, default_namespace: &str) -> Result<Self> {
        let re = Regex::new(pattern)
            .map_err(|e| Error::config("namespace pattern", format!("{pattern:?}: {e}")))?;
        if !re.capture_names().any(|n| n == Some("namespace")) {
            return Err(Error::config(
                "namespace pattern",
                format!("{pattern:?} has no (?P<namespace>...) group"),
            ));
        }
        check_part("default namespace", default_namespace, MAX_QUEUE_NAME_LEN)?;
        self.pattern = re;
        self.default_namespace = default_namespace.to_owned();
        Ok(self)
    }

    /// The prefix.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace pattern.
    #[must_use]
    pub fn pattern(&self) -> &str {
        self.pattern.as_str()
    }

    /// The namespace of queues the pattern does not match.
    #[must_use]
    pub fn default_namespace(&self) -> &str {
        &self.default_namespace
    }

    /// `<prefix>q.<queue>`.
    #[must_use]
    pub fn queue_channel(&self, queue: &QueueName) -> String {
        format!("{}q.{}", self.prefix, queue)
    }

    /// `<prefix>r.<queue>`: where the queue's finished jobs with stored results are announced
    /// (the payload: a JSON array of their job ids, or `"*"` when they do not fit).
    #[must_use]
    pub fn results_channel(&self, queue: &QueueName) -> String {
        format!("{}r.{}", self.prefix, queue)
    }

    /// The namespace of a queue.
    #[must_use]
    pub fn namespace(&self, queue: &QueueName) -> String {
        self.pattern
            .captures(queue.as_str())
            .and_then(|c| c.name("namespace"))
            .map(|m| m.as_str())
            .filter(|ns| !ns.is_empty())
            .unwrap_or(&self.default_namespace)
            .to_owned()
    }

    /// `<prefix>ns.<namespace>`.
    #[must_use]
    pub fn namespace_channel(&self, namespace: &str) -> String {
        format!("{}ns.{}", self.prefix, namespace)
    }

    /// `<prefix>created`: where queue-created events go.
    #[must_use]
    pub fn created_channel(&self) -> String {
        format!("{}created", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> QueueName {
        QueueName::new(s).expect("valid")
    }

    #[test]
    fn default_naming() {
        let c = NotifyChannels::default();
        assert_eq!(c.queue_channel(&q("email")), "apq.q.email");
        assert_eq!(c.namespace(&q("email")), "default");
        assert_eq!(c.namespace(&q("billing_queue")), "billing");
        assert_eq!(c.namespace(&q("billing_queue_dlq")), "billing");
        assert_eq!(c.created_channel(), "apq.created");
        assert_eq!(c.results_channel(&q("email")), "apq.r.email");
    }

    #[test]
    fn every_channel_fits_63_bytes() {
        let c = NotifyChannels::with_prefix(&"p".repeat(MAX_PREFIX_LEN)).expect("max prefix");
        let long = q(&"x".repeat(MAX_QUEUE_NAME_LEN));
        assert!(c.queue_channel(&long).len() <= MAX_CHANNEL_LEN);
        assert!(c.results_channel(&long).len() <= MAX_CHANNEL_LEN);
        assert!(c.namespace_channel(&c.namespace(&long)).len() <= MAX_CHANNEL_LEN);
        let anything = c
            .clone()
            .namespace_pattern(r"(?P<namespace>.*)", "d")
            .expect("pattern");
        assert!(anything.namespace_channel(&anything.namespace(&long)).len() <= MAX_CHANNEL_LEN);
        assert!(NotifyChannels::with_prefix(&"p".repeat(MAX_PREFIX_LEN + 1)).is_err());
    }

    #[test]
    fn bad_prefixes_and_patterns_are_refused() {
        for bad in ["", "Apq", "a'b", "a;b", "a b", "é"] {
            assert!(NotifyChannels::with_prefix(bad).is_err(), "{bad:?}");
        }
        let c = NotifyChannels::default();
        assert!(c.clone().namespace_pattern("(", "x").is_err());
        assert!(c.clone().namespace_pattern(r"(\w+)_q", "x").is_err());
        assert!(
            c.clone()
                .namespace_pattern(r"(?P<namespace>\w+)_q", "Bad")
                .is_err()
        );
        let custom = c
            .namespace_pattern(r"^(?P<namespace>[a-z]+)__", "misc")
            .expect("valid");
        assert_eq!(custom.namespace(&q("shop__orders")), "shop");
        assert_eq!(custom.namespace(&q("orders")), "misc");
    }
}
