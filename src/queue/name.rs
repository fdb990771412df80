//! Validated queue names.

use std::{fmt, sync::Arc};

use crate::error::QueueNameError;

/// The longest queue name accepted, in bytes.
///
/// Every identifier derived from a queue name must fit PostgreSQL's 63-byte limit
/// (`NAMEDATALEN - 1`); longer identifiers are silently truncated by the server, which would make
/// two queues share a table. The longest derived identifier is the archive index of the
/// dead-letter queue, `archived_at_idx_<name>_dlq`: 16 + n + 4 ≤ 63 gives n ≤ 43. The others are
/// shorter: `q_<name>_dlq_msg_id_seq` (17 + n), `a_<name>_dlq` (6 + n), PGMQ's own limit of 47 on the
/// dead-letter queue's name (n + 4), and the notification channel (prefix + n, with the prefix
/// limited to 63 − 43 = 20 bytes).
pub const MAX_QUEUE_NAME_LEN: usize = 43;

/// Suffix of the dead-letter queue derived from a queue name.
pub const DEAD_LETTER_SUFFIX: &str = "_dlq";

/// A queue name that is safe to turn into SQL identifiers and notification channels.
///
/// Rules: 1 to [`MAX_QUEUE_NAME_LEN`] bytes of `[a-z0-9_]`, not starting with a digit. Upper case
/// is rejected rather than folded, because PGMQ folds table names to lower case but keeps the
/// original spelling in `pgmq.meta`, and the two would disagree.
///
/// Validation happens once, in [`QueueName::new`]; every SQL string this crate builds from a queue
/// takes a `QueueName`, so unvalidated text never reaches SQL.
///
/// # Example
///
/// ```
/// use apalis_pgmq_notify::QueueName;
///
/// let q = QueueName::new("email")?;
/// assert_eq!(q.as_str(), "email");
/// assert_eq!(q.dead_letter().as_str(), "email_dlq");
/// assert!(QueueName::new("email; drop table users").is_err());
/// # Ok::<(), apalis_pgmq_notify::QueueNameError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(Arc<str>);

impl QueueName {
    /// Validates `name`.
    ///
    /// # Errors
    ///
    /// [`QueueNameError`] when the name is empty, too long, or has a character outside `[a-z0-9_]`
    /// (or starts with a digit).
    pub fn new(name: impl AsRef<str>) -> Result<Self, QueueNameError> {
        let name = name.as_ref();
        validate(name, MAX_QUEUE_NAME_LEN)?;
        Ok(Self(Arc::from(name)))
    }

    /// The name as given.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The dead-letter queue of this queue: `<name>_dlq`.
    ///
    /// Its length may exceed [`MAX_QUEUE_NAME_LEN`] by the suffix; it is still within PGMQ's limit
    /// and all of its own identifiers fit in 63 bytes. A dead-letter queue has no dead-letter queue.
    #[must_use]
    pub fn dead_letter(&self) -> Self {
        Self(Arc::from(format!("{}{DEAD_LETTER_SUFFIX}", self.0)))
    }

    /// `pgmq."q_<name>"`, the queue table, quoted.
    #[must_use]
    pub fn queue_table(&self) -> String {
        format!("pgmq.\"q_{}\"", self.0)
    }

    /// `pgmq."a_<name>"`, the archive table, quoted.
    #[must_use]
    pub fn archive_table(&self) -> String {
        format!("pgmq.\"a_{}\"", self.0)
    }
}

fn validate(name: &str, max: usize) -> Result<(), QueueNameError> {
    if name.is_empty() {
        return Err(QueueNameError::Empty);
    }
    if name.len() > max {
        return Err(QueueNameError::TooLong {
            name: name.to_owned(),
            len: name.len(),
            max,
        });
    }
    for (position, ch) in name.char_indices() {
        let ok = ch.is_ascii_lowercase() || ch == '_' || (ch.is_ascii_digit() && position > 0);
        if !ok {
            return Err(QueueNameError::InvalidCharacter {
                name: name.to_owned(),
                ch,
                position,
            });
        }
    }
    Ok(())
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QueueName({:?})", &*self.0)
    }
}

impl AsRef<str> for QueueName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for QueueName {
    type Err = QueueNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<&str> for QueueName {
    type Error = QueueNameError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for QueueName {
    type Error = QueueNameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in [
            "a",
            "email",
            "_private",
            "q1",
            "email_queue_2",
            &"x".repeat(43),
        ] {
            assert_eq!(QueueName::new(ok).map(|q| q.to_string()), Ok(ok.to_owned()));
        }
    }

    #[test]
    fn rejects_hostile_names() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("Email", "upper case"),
            ("1queue", "leading digit"),
            ("a b", "space"),
            ("a;drop table x", "semicolon"),
            ("a'b", "quote"),
            ("a\"b", "double quote"),
            ("a-b", "dash"),
            ("a.b", "dot"),
            ("a$b", "dollar"),
            ("émail", "non-ASCII"),
            ("queue\u{0}", "NUL"),
            ("a--b", "comment"),
        ];
        for (name, why) in cases {
            assert!(QueueName::new(name).is_err(), "{why}: {name:?} accepted");
        }
        let long = "x".repeat(44);
        assert!(matches!(
            QueueName::new(&long),
            Err(QueueNameError::TooLong {
                len: 44,
                max: 43,
                ..
            })
        ));
        // Multi-byte characters count in bytes and are rejected anyway.
        assert!(matches!(
            QueueName::new("ü"),
            Err(QueueNameError::InvalidCharacter {
                ch: 'ü',
                position: 0,
                ..
            })
        ));
    }

    #[test]
    fn derived_identifiers_fit_63_bytes() {
        let q = QueueName::new("x".repeat(MAX_QUEUE_NAME_LEN)).expect("max length is valid");
        let dlq = q.dead_letter();
        let idents = [
            format!("q_{q}"),
            format!("a_{q}"),
            format!("q_{q}_vt_idx"),
            format!("q_{q}_msg_id_seq"),
            format!("archived_at_idx_{q}"),
            format!("q_{dlq}"),
            format!("a_{dlq}"),
            format!("q_{dlq}_vt_idx"),
            format!("q_{dlq}_msg_id_seq"),
            format!("archived_at_idx_{dlq}"),
        ];
        for ident in idents {
            assert!(ident.len() <= 63, "{ident} is {} bytes", ident.len());
        }
        assert_eq!(format!("archived_at_idx_{dlq}").len(), 63);
    }

    #[test]
    fn error_messages_name_the_problem() {
        let err = QueueName::new("bad name").expect_err("space is invalid");
        let text = err.to_string();
        assert!(
            text.contains("\"bad name\"") && text.contains("' '"),
            "{text}"
        );
    }
}
