//! Multi-host connection strings (libpq's "Specifying Multiple Hosts"), which sqlx does not
//! parse: `postgres://u@h1:5432,h2:5433/db?target_session_attrs=read-write` and
//! `host=h1,h2 port=5432,5433 user=u dbname=db target_session_attrs=read-write`.

use std::{str::FromStr, sync::Arc, time::Duration};

use sqlx::{
    ConnectOptions, Connection, PgConnection, PgPool, Row,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::error::{Error, Result};

/// Which server of a multi-host string a connection must land on: libpq's
/// `target_session_attrs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TargetSessionAttrs {
    /// The first host that answers (the default).
    #[default]
    Any,
    /// A server that takes writes (`transaction_read_only` is off): the primary.
    ReadWrite,
    /// A server that does not take writes.
    ReadOnly,
    /// A server not in recovery.
    Primary,
    /// A hot standby (in recovery).
    Standby,
    /// A hot standby if one answers, else any host.
    PreferStandby,
}

impl TargetSessionAttrs {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "any" => Self::Any,
            "read-write" => Self::ReadWrite,
            "read-only" => Self::ReadOnly,
            "primary" => Self::Primary,
            "standby" => Self::Standby,
            "prefer-standby" => Self::PreferStandby,
            other => {
                return Err(Error::config(
                    "target_session_attrs",
                    format!(
                        "{other:?} is not one of any, read-write, read-only, primary, standby, prefer-standby"
                    ),
                ));
            }
        })
    }

    /// Whether a server with these properties fits (`PreferStandby`: on its first pass).
    fn fits(self, read_only: bool, in_recovery: bool) -> bool {
        match self {
            Self::Any => true,
            Self::ReadWrite => !read_only,
            Self::ReadOnly => read_only,
            Self::Primary => !in_recovery,
            Self::Standby | Self::PreferStandby => in_recovery,
        }
    }
}

/// A connection string naming one or more hosts, each tried in turn for the one that fits its
/// `target_session_attrs` (as libpq does). Parses the URL form
/// (`postgres://u@h1:5432,h2:5433/db?target_session_attrs=read-write`, or
/// `?host=h1,h2&port=5432,5433`) and the keyword/value form
/// (`host=h1,h2 port=5432,5433 user=u dbname=db target_session_attrs=read-write`); one port
/// for every host, or one per host. A single-host string is what sqlx makes of it.
///
/// [`connect_pool`](Self::connect_pool) builds a pool whose every new connection is checked
/// (one landing on a server that does not fit is refused, and the hosts are chosen again), and
/// [`follow`](Self::follow) points a pool at the host that fits now: a
/// [`Runtime`](crate::Runtime) given the hosts with
/// [`Runtime::hosts`](crate::Runtime::hosts) does so every time its listener reconnects, so a
/// failover moves the pool and the listener to the new primary.
///
/// # Example
///
/// ```no_run
/// # async fn run() -> Result<(), apalis_pgmq_notify::Error> {
/// use apalis_pgmq_notify::{MultiHost, Runtime};
/// let hosts: MultiHost =
///     "postgres://app@db1:5432,db2:5432/app?target_session_attrs=read-write".parse()?;
/// let pool = hosts.connect_pool(sqlx::postgres::PgPoolOptions::new()).await?;
/// apalis_pgmq_notify::setup(&pool).await?;
/// let runtime = Runtime::new(&pool).hosts(hosts);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MultiHost {
    /// One single-host set of options per host, in the string's order.
    hosts: Vec<PgConnectOptions>,
    target: TargetSessionAttrs,
    /// libpq's `connect_timeout`, per host (default 5 s here: a host that does not answer
    /// must not hold up the others for long).
    connect_timeout: Duration,
}

/// What a host is told apart by, read on a new connection.
async fn session_state(conn: &mut PgConnection) -> Result<(bool, bool)> {
    let row =
        sqlx::raw_sql("SELECT current_setting('transaction_read_only'), pg_is_in_recovery()::text")
            .fetch_one(&mut *conn)
            .await?;
    let read_only: String = row.try_get(0)?;
    let recovery: String = row.try_get(1)?;
    Ok((read_only == "on", recovery == "true"))
}

fn host_of(o: &PgConnectOptions) -> String {
    format!("{}:{}", o.get_host(), o.get_port())
}

impl MultiHost {
    /// Parses a connection string (see the type's docs).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming what does not parse (a port, a count of ports that matches
    /// neither one nor the hosts, an unknown `target_session_attrs`).
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.contains("://") {
            Self::parse_url(s)
        } else {
            Self::parse_url(&keywords_to_url(s)?)
        }
    }

    fn parse_url(url: &str) -> Result<Self> {
        let bad = |reason: String| Error::config("database URL", reason);
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("no scheme".into()))?;
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (userinfo, hostlist) = match authority.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), authority),
        };
        let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
        let mut hosts: Vec<String> = Vec::new();
        let mut ports: Vec<String> = Vec::new();
        for item in hostlist.split(',').filter(|h| !h.is_empty()) {
            let (h, p) = split_host_port(item);
            hosts.push(h.to_owned());
            ports.push(p.unwrap_or("").to_owned());
        }
        let mut target = TargetSessionAttrs::Any;
        let mut connect_timeout = Duration::from_secs(5);
        let mut rest_query = Vec::new();
        let (mut query_hosts, mut query_ports) = (None, None);
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = percent_decode(v);
            match k {
                "target_session_attrs" => target = TargetSessionAttrs::parse(&v)?,
                "connect_timeout" => {
                    let secs: u64 = v
                        .parse()
                        .map_err(|_| bad(format!("connect_timeout {v:?} is not whole seconds")))?;
                    if secs > 0 {
                        connect_timeout = Duration::from_secs(secs.max(2));
                    }
                }
                "host" | "hostaddr" => {
                    query_hosts = Some(v.split(',').map(str::to_owned).collect::<Vec<_>>());
                }
                "port" => query_ports = Some(v.split(',').map(str::to_owned).collect::<Vec<_>>()),
                _ => rest_query.push(kv.to_owned()),
            }
        }
        if let Some(h) = query_hosts {
            hosts = h;
            ports = vec![String::new(); hosts.len()];
        }
        if let Some(p) = query_ports {
            if p.len() == 1 {
                ports = vec![p[0].clone(); hosts.len().max(1)];
            } else if p.len() == hosts.len() {
                ports = p;
            } else {
                return Err(bad(format!(
                    "{} ports for {} hosts: give one port for all or one per host",
                    p.len(),
                    hosts.len()
                )));
            }
        }
        if hosts.is_empty() {
            hosts.push(String::new());
            ports.push(ports.first().cloned().unwrap_or_default());
        }
        let mut options = Vec::with_capacity(hosts.len());
        for (host, port) in hosts.iter().zip(ports.iter()) {
            if !port.is_empty() && port.parse::<u16>().is_err() {
                return Err(bad(format!("port {port:?} is not a port number")));
            }
            let mut q = rest_query.clone();
            let authority_host = if host.is_empty() {
                String::new()
            } else if host.starts_with('/') {
                // A Unix socket directory.
                q.push(format!("host={}", percent_encode(host)));
                "localhost".to_owned()
            } else if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            let port = if port.is_empty() {
                String::new()
            } else {
                format!(":{port}")
            };
            let query = if q.is_empty() {
                String::new()
            } else {
                format!("?{}", q.join("&"))
            };
            let single = format!("{scheme}://{userinfo}{authority_host}{port}{path}{query}");
            let parsed = PgConnectOptions::from_str(&single)
                .map_err(|e| bad(format!("{}: {e}", host_of_text(host, port.as_str()))))?;
            // The URL keeps an IPv6 address in brackets; a socket address has none.
            let parsed = if host.contains(':') {
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                parsed.host(bare)
            } else {
                parsed
            };
            options.push(parsed);
        }
        Ok(Self {
            hosts: options,
            target,
            connect_timeout,
        })
    }

    /// The hosts' options, in the string's order.
    #[must_use]
    pub fn hosts(&self) -> &[PgConnectOptions] {
        &self.hosts
    }

    /// The `target_session_attrs` asked for.
    #[must_use]
    pub fn target(&self) -> TargetSessionAttrs {
        self.target
    }

    /// Tries the hosts in order (each within `connect_timeout`, 5 s by default) and returns
    /// the options of the first that fits `target_session_attrs` (`prefer-standby`: a standby,
    /// else the first that answers).
    ///
    /// # Errors
    ///
    /// [`Error::Unreachable`] listing each host and why it was not chosen.
    pub async fn choose(&self) -> Result<PgConnectOptions> {
        let mut why = Vec::new();
        let mut answered: Option<PgConnectOptions> = None;
        for host in &self.hosts {
            let probe = async {
                let mut conn = host.connect().await?;
                let state = session_state(&mut conn).await;
                let _ = conn.close().await;
                state
            };
            match tokio::time::timeout(self.connect_timeout, probe).await {
                Ok(Ok((read_only, in_recovery))) => {
                    if self.target.fits(read_only, in_recovery) {
                        return Ok(host.clone());
                    }
                    answered.get_or_insert_with(|| host.clone());
                    why.push(format!(
                        "{}: {}",
                        host_of(host),
                        describe_state(read_only, in_recovery)
                    ));
                }
                Ok(Err(e)) => why.push(format!("{}: {e}", host_of(host))),
                Err(_) => why.push(format!(
                    "{}: no answer within {}",
                    host_of(host),
                    crate::config::human::HumanDuration(self.connect_timeout)
                )),
            }
        }
        if self.target == TargetSessionAttrs::PreferStandby
            && let Some(host) = answered
        {
            return Ok(host);
        }
        Err(Error::Unreachable {
            cause: format!(
                "no host fits target_session_attrs={}: {}",
                self.target_name(),
                why.join("; ")
            ),
        })
    }

    fn target_name(&self) -> &'static str {
        match self.target {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    /// A pool on the host [`choose`](Self::choose) picks, with `options` (sizes, timeouts)
    /// and a check of every new connection: one that lands on a server that no longer fits
    /// (a demoted primary) is refused before it is used, and sqlx's pool connects again.
    /// Point the pool at a new host with [`follow`](Self::follow) (a runtime given these
    /// hosts does at every reconnect of its listener). Any `after_connect` of `options` is
    /// replaced.
    ///
    /// # Errors
    ///
    /// [`Error::Unreachable`] if no host fits.
    pub async fn connect_pool(&self, options: PgPoolOptions) -> Result<PgPool> {
        let chosen = self.choose().await?;
        let target = self.target;
        let name = Arc::<str>::from(self.target_name());
        Ok(options
            .after_connect(move |conn, _meta| {
                let name = name.clone();
                Box::pin(async move {
                    let (read_only, in_recovery) = session_state(conn)
                        .await
                        .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                    if target.fits(read_only, in_recovery) {
                        Ok(())
                    } else {
                        Err(sqlx::Error::Protocol(format!(
                            "the server no longer fits target_session_attrs={name}: {}",
                            describe_state(read_only, in_recovery)
                        )))
                    }
                })
            })
            .connect_lazy_with(chosen))
    }

    /// Chooses again and, if another host fits now, points `pool` at it (connections already
    /// open stay as they are: those to a demoted or dead server fail and are replaced).
    /// Returns the chosen host's options. A runtime given the hosts calls this at every
    /// reconnect of its listener; a process without a listener (one that only pushes) calls
    /// it when a push fails with [`Error::Unreachable`].
    ///
    /// # Errors
    ///
    /// [`Error::Unreachable`] if no host fits; the pool is left as it is.
    pub async fn follow(&self, pool: &PgPool) -> Result<PgConnectOptions> {
        let chosen = self.choose().await?;
        let current = pool.connect_options();
        if host_of(&chosen) != host_of(&current) {
            tracing::info!(from = %host_of(&current), to = %host_of(&chosen),
                "the pool follows the server that fits target_session_attrs");
            pool.set_connect_options(chosen.clone());
        }
        Ok(chosen)
    }
}

impl FromStr for MultiHost {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

fn describe_state(read_only: bool, in_recovery: bool) -> &'static str {
    match (in_recovery, read_only) {
        (true, _) => "a hot standby (in recovery)",
        (false, true) => "read-only (default_transaction_read_only)",
        (false, false) => "a primary taking writes",
    }
}

fn host_of_text(host: &str, port: &str) -> String {
    format!("host {host}{port}")
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(item: &str) -> (&str, Option<&str>) {
    if let Some(rest) = item.strip_prefix('[') {
        if let Some((h, after)) = rest.split_once(']') {
            return (h, after.strip_prefix(':'));
        }
        return (item, None);
    }
    match item.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        _ => (item, None),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(hex) = std::str::from_utf8(&bytes[i + 1..i + 3])
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// libpq's keyword/value form (`host=a,b port=1,2 user=u dbname=d ...`, values optionally in
/// single quotes with `\'` and `\\`) as the equivalent URL.
fn keywords_to_url(s: &str) -> Result<String> {
    let bad = |reason: String| Error::config("connection string", reason);
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(bad(format!("{key:?} has no value (expected key=value)")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '\'' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(bad(format!("the value of {key:?} has no closing quote")));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        pairs.push((key, value));
    }
    let mut user = None;
    let mut password = None;
    let mut dbname = None;
    let mut query = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "user" => user = Some(v),
            "password" => password = Some(v),
            "dbname" => dbname = Some(v),
            _ => query.push(format!("{k}={}", percent_encode(&v))),
        }
    }
    let userinfo = match (user, password) {
        (Some(u), Some(p)) => format!("{}:{}@", percent_encode(&u), percent_encode(&p)),
        (Some(u), None) => format!("{}@", percent_encode(&u)),
        (None, Some(p)) => format!(":{}@", percent_encode(&p)),
        (None, None) => String::new(),
    };
    let path = dbname.map_or(String::new(), |d| format!("/{}", percent_encode(&d)));
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    };
    Ok(format!("postgres://{userinfo}{path}{query}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(m: &MultiHost) -> Vec<(String, u16)> {
        m.hosts()
            .iter()
            .map(|o| (o.get_host().to_owned(), o.get_port()))
            .collect()
    }

    #[test]
    fn url_form_with_a_port_per_host() {
        let m = MultiHost::parse(
            "postgres://app:s%40cret@10.0.0.1:5432,db2:5433,[::1]:5434/appdb?target_session_attrs=read-write&sslmode=disable&application_name=x",
        )
        .expect("parses");
        assert_eq!(
            hp(&m),
            vec![
                ("10.0.0.1".into(), 5432),
                ("db2".into(), 5433),
                ("::1".into(), 5434)
            ]
        );
        assert_eq!(m.target(), TargetSessionAttrs::ReadWrite);
        for o in m.hosts() {
            assert_eq!(o.get_username(), "app");
            assert_eq!(o.get_database(), Some("appdb"));
            assert_eq!(o.get_application_name(), Some("x"));
        }
    }

    #[test]
    fn url_form_as_pg_auto_failover_prints_it() {
        let m = MultiHost::parse(
            "postgres://127.0.0.1:57433,127.0.0.1:57434/postgres?target_session_attrs=read-write&sslmode=disable",
        )
        .expect("parses");
        assert_eq!(
            hp(&m),
            vec![("127.0.0.1".into(), 57433), ("127.0.0.1".into(), 57434)]
        );
    }

    #[test]
    fn url_form_with_hosts_and_ports_in_the_query() {
        let m = MultiHost::parse("postgres://u@/db?host=h1,h2&port=6000,6001&connect_timeout=3")
            .expect("parses");
        assert_eq!(hp(&m), vec![("h1".into(), 6000), ("h2".into(), 6001)]);
        assert_eq!(m.connect_timeout, Duration::from_secs(3));
        let one_port = MultiHost::parse("postgres://u@h1,h2/db?port=6000").expect("parses");
        assert_eq!(
            hp(&one_port),
            vec![("h1".into(), 6000), ("h2".into(), 6000)]
        );
    }

    #[test]
    fn keyword_form_with_quotes() {
        let m = MultiHost::parse(
            r"host=h1,h2 port=5432,5433 user=app password='it\'s a secret' dbname = 'my db' target_session_attrs=primary sslmode=disable",
        )
        .expect("parses");
        assert_eq!(hp(&m), vec![("h1".into(), 5432), ("h2".into(), 5433)]);
        assert_eq!(m.target(), TargetSessionAttrs::Primary);
        assert_eq!(m.hosts()[1].get_database(), Some("my db"));
        assert_eq!(m.hosts()[0].get_username(), "app");
    }

    #[test]
    fn a_single_host_stays_what_sqlx_makes_of_it() {
        let m = MultiHost::parse("postgres://u@db:6543/app").expect("parses");
        assert_eq!(hp(&m), vec![("db".into(), 6543)]);
        assert_eq!(m.target(), TargetSessionAttrs::Any);
        let sock = MultiHost::parse("host=/var/run/postgresql dbname=app").expect("parses");
        assert_eq!(sock.hosts().len(), 1);
    }

    #[test]
    fn errors_say_what_does_not_parse() {
        for (s, want) in [
            ("postgres://h1,h2/db?port=1,2,3", "3 ports for 2 hosts"),
            ("postgres://h1:x/db", "not a port number"),
            (
                "postgres://h1/db?target_session_attrs=writable",
                "target_session_attrs",
            ),
            ("host=h1 dbname", "has no value"),
            ("host='h1 dbname=x", "no closing quote"),
        ] {
            let e = MultiHost::parse(s).expect_err(s);
            assert!(e.to_string().contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn targets_fit_as_libpq_decides() {
        use TargetSessionAttrs::*;
        // (read_only, in_recovery) of a primary, a standby, a read-only primary.
        let servers = [(false, false), (true, true), (true, false)];
        for (t, want) in [
            (Any, [true, true, true]),
            (ReadWrite, [true, false, false]),
            (ReadOnly, [false, true, true]),
            (Primary, [true, false, true]),
            (Standby, [false, true, false]),
        ] {
            let got = servers.map(|(ro, rec)| t.fits(ro, rec));
            assert_eq!(got, want, "{t:?}");
        }
    }
}
