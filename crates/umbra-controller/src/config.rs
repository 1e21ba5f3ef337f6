//! The controller's configuration: what an operator writes, parsed strictly.
//!
//! Unknown keys are errors (`deny_unknown_fields`), every key has a default, and
//! [`ControllerConfig::validate`] names the field at fault. Secrets (`ca_key`, a database URL
//! that may hold a password) never appear in `Debug` output.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest lifetime of an enrollment token.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Longest `renew_grace_secs`.
pub(crate) const MAX_RENEW_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Controller settings. See the field docs for defaults.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// Where the database (by default), the generated KEK file and nothing else live.
    /// Default `/var/lib/umbra/controller`.
    pub data_dir: PathBuf,
    /// HTTPS listen address. Default `127.0.0.1:7443`.
    pub listen: SocketAddr,
    /// The URL peers use to reach this controller, if it differs from the listen address.
    pub public_url: Option<String>,
    /// DNS names and IP addresses in the controller's server certificate.
    /// Default `["localhost", "127.0.0.1"]`.
    pub server_names: Vec<String>,
    /// Default `sqlite://<data_dir>/umbra.db`. Only `sqlite:` URLs are supported by this build.
    pub database_url: Option<String>,
    /// Key-encryption key of the CA private key: 64 hex digits or base64 of 32 bytes.
    /// If unset, the environment variable `UMBRA_CA_KEY` is used; if that is unset too, a key is
    /// generated once into `<data_dir>/ca.kek` (mode 0600) and a warning is logged.
    pub ca_key: Option<String>,
    /// Organisation name (a valid Umbra name). Default `default`.
    pub org: String,
    /// Lifetime of issued peer certificates, seconds. Default 86400 (1 day), at most 7 days.
    pub cert_lifetime_secs: u64,
    /// How long after its certificate expired a device, connector or broker may still renew
    /// it, seconds: a laptop asleep over a weekend renews when it wakes instead of enrolling
    /// again. Never a certificate once one renewed from it (or a later one of its identity)
    /// has been used at the controller, a revoked one, a revoked device or connector, or the
    /// device of a disabled user. 0 turns it off
    /// (an expired certificate then needs a new enrollment). Default 604800 (7 days), at most
    /// 30 days.
    pub renew_grace_secs: u64,
    /// Default lifetime of enrollment tokens, seconds. Default 3600, at most 7 days.
    pub token_ttl_secs: u64,
    /// TLS handshakes the API runs at once. When all are taken, a new connection evicts the
    /// oldest handshake, so that stalled ones cannot keep a real client out; one source
    /// address (an IPv6 /64) holds at most an eighth of them and evicts its own, so a flood
    /// from one host cannot evict every distant client. Clients behind one NAT or load
    /// balancer count as one source: for more than an eighth of this many of them
    /// handshaking at once, raise it. Default 256.
    pub max_pending_handshakes: usize,
    /// Connections without a client certificate (enrollment, administration) held at once.
    /// When all are taken, a new one evicts the oldest. Default 1024.
    pub max_anonymous_connections: usize,
    /// How long a connection without a client certificate may stay open, seconds (enrolled
    /// peers' connections, which long-poll, are not limited). Default 60.
    pub anonymous_connection_secs: u64,
    /// Connections one enrolled identity (device, connector, broker) may hold open at once;
    /// more are closed after the handshake. Each role process holds one or two. Default 32.
    pub max_connections_per_peer: usize,
    /// Days audit records are kept, counted from when this controller stored them (not from
    /// a broker's clock); older ones are deleted (checked hourly). 0 keeps them for ever.
    /// Default 365, at most 36500.
    pub audit_retention_days: u64,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            data_dir: PathBuf::from("/var/lib/umbra/controller"),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7443),
            public_url: None,
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            database_url: None,
            ca_key: None,
            org: "default".into(),
            cert_lifetime_secs: 86_400,
            renew_grace_secs: 7 * 86_400,
            token_ttl_secs: 3_600,
            max_pending_handshakes: 256,
            max_anonymous_connections: 1024,
            anonymous_connection_secs: 60,
            max_connections_per_peer: 32,
            audit_retention_days: 365,
        }
    }
}

impl fmt::Debug for ControllerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControllerConfig")
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("public_url", &self.public_url)
            .field("server_names", &self.server_names)
            .field("database_url", &self.database_url.as_ref().map(|_| ".."))
            .field("ca_key", &self.ca_key.as_ref().map(|_| ".."))
            .field("org", &self.org)
            .field("cert_lifetime_secs", &self.cert_lifetime_secs)
            .field("renew_grace_secs", &self.renew_grace_secs)
            .field("token_ttl_secs", &self.token_ttl_secs)
            .field("max_pending_handshakes", &self.max_pending_handshakes)
            .field("max_anonymous_connections", &self.max_anonymous_connections)
            .field("anonymous_connection_secs", &self.anonymous_connection_secs)
            .field("max_connections_per_peer", &self.max_connections_per_peer)
            .field("audit_retention_days", &self.audit_retention_days)
            .finish()
    }
}

/// A configuration value that cannot be used, and which field holds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration field `{field}`: {reason}")]
pub struct ConfigError {
    /// The field at fault, as spelt in the configuration file.
    pub field: &'static str,
    /// Why it cannot be used (never the value of a secret field).
    pub reason: String,
}

impl ConfigError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError {
            field,
            reason: reason.into(),
        }
    }
}

/// The host of an `https://` URL (an IPv6 address without its brackets).
fn url_host(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let hostport = authority.rsplit('@').next()?;
    if let Some(v6) = hostport.strip_prefix('[') {
        return v6.split(']').next();
    }
    hostport.split(':').next().filter(|h| !h.is_empty())
}

impl ControllerConfig {
    /// Checks every field; the error names the first one at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("data_dir", "must not be empty"));
        }
        if !umbra_proto::valid_name(&self.org) {
            return Err(ConfigError::new(
                "org",
                "must be 1-63 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit",
            ));
        }
        if let Some(url) = &self.public_url
            && (!url.starts_with("https://") || url.len() <= "https://".len())
        {
            return Err(ConfigError::new("public_url", "must be an https:// URL"));
        }
        if self.server_names.is_empty() {
            return Err(ConfigError::new(
                "server_names",
                "must name at least one host",
            ));
        }
        for n in &self.server_names {
            if !valid_server_name(n) {
                return Err(ConfigError::new(
                    "server_names",
                    format!("{n:?} is neither a DNS name nor an IP address"),
                ));
            }
        }
        // Peers check the controller's certificate against the host they dial: one not in
        // `server_names` fails every enrollment, far from this file.
        if let Some(host) = self.public_url.as_deref().and_then(url_host)
            && !self
                .server_names
                .iter()
                .any(|n| n.eq_ignore_ascii_case(host))
        {
            return Err(ConfigError::new(
                "public_url",
                format!(
                    "its host {host:?} is not one of server_names ({}), which the controller's \
                     certificate is for: add it there",
                    self.server_names.join(", ")
                ),
            ));
        }
        if let Some(url) = &self.database_url
            && !url.starts_with("sqlite:")
        {
            return Err(ConfigError::new(
                "database_url",
                "only sqlite: URLs are supported by this build",
            ));
        }
        if let Some(key) = &self.ca_key
            && umbra_pki::KeyEncryptionKey::parse(key).is_err()
        {
            return Err(ConfigError::new(
                "ca_key",
                "must be 32 bytes as 64 hex digits or base64",
            ));
        }
        let max_cert = umbra_pki::MAX_LIFETIME.as_secs();
        if self.cert_lifetime_secs == 0 || self.cert_lifetime_secs > max_cert {
            return Err(ConfigError::new(
                "cert_lifetime_secs",
                format!("must be between 1 and {max_cert}"),
            ));
        }
        if self.renew_grace_secs > MAX_RENEW_GRACE.as_secs() {
            return Err(ConfigError::new(
                "renew_grace_secs",
                format!(
                    "must be at most {} (30 days; 0 turns renewal after expiry off)",
                    MAX_RENEW_GRACE.as_secs()
                ),
            ));
        }
        let max_ttl = MAX_TOKEN_TTL.as_secs();
        if self.token_ttl_secs == 0 || self.token_ttl_secs > max_ttl {
            return Err(ConfigError::new(
                "token_ttl_secs",
                format!("must be between 1 and {max_ttl}"),
            ));
        }
        if !(1..=65_536).contains(&self.max_pending_handshakes) {
            return Err(ConfigError::new(
                "max_pending_handshakes",
                "must be between 1 and 65536",
            ));
        }
        if !(1..=1_000_000).contains(&self.max_anonymous_connections) {
            return Err(ConfigError::new(
                "max_anonymous_connections",
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=4_096).contains(&self.max_connections_per_peer) {
            return Err(ConfigError::new(
                "max_connections_per_peer",
                "must be between 1 and 4096",
            ));
        }
        if !(1..=3_600).contains(&self.anonymous_connection_secs) {
            return Err(ConfigError::new(
                "anonymous_connection_secs",
                "must be between 1 and 3600",
            ));
        }
        if self.audit_retention_days > 36_500 {
            return Err(ConfigError::new(
                "audit_retention_days",
                "must be at most 36500 (0 keeps records for ever)",
            ));
        }
        Ok(())
    }

    /// The database in force: the configured URL, else the file in the data directory.
    pub(crate) fn database(&self) -> crate::store::Database {
        match &self.database_url {
            Some(u) => crate::store::Database::Url(u.clone()),
            None => crate::store::Database::File(self.data_dir.join("umbra.db")),
        }
    }

    pub(crate) fn audit_retention(&self) -> Duration {
        Duration::from_secs(self.audit_retention_days.saturating_mul(86_400))
    }

    pub(crate) fn cert_lifetime(&self) -> Duration {
        Duration::from_secs(self.cert_lifetime_secs)
    }

    pub(crate) fn renew_grace(&self) -> Duration {
        Duration::from_secs(self.renew_grace_secs)
    }

    pub(crate) fn token_ttl(&self) -> Duration {
        Duration::from_secs(self.token_ttl_secs)
    }
}

/// An IP address, or a DNS name of letters, digits and hyphens in dot-separated labels (no
/// '_': certificates name hosts, and a host name has none).
fn valid_server_name(n: &str) -> bool {
    n.parse::<IpAddr>().is_ok() || (umbra_proto::dns_name(n) && !n.contains('_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ControllerConfig::default().validate().unwrap();
    }

    #[test]
    fn unknown_field_is_an_error() {
        let err = serde_json::from_str::<ControllerConfig>(r#"{"org":"a","lissten":"x"}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("lissten"), "{err}");
    }

    #[test]
    fn partial_config_takes_defaults() {
        let c: ControllerConfig = serde_json::from_str(r#"{"org":"acme"}"#).unwrap();
        assert_eq!(c.org, "acme");
        assert_eq!(c.cert_lifetime_secs, 86_400);
        assert_eq!(c.listen.port(), 7443);
    }

    #[test]
    fn validate_names_the_field() {
        type Edit = Box<dyn Fn(&mut ControllerConfig)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("org", Box::new(|c| c.org = "Bad Org".into())),
            ("server_names", Box::new(|c| c.server_names = vec![])),
            (
                "server_names",
                Box::new(|c| c.server_names = vec!["a b".into()]),
            ),
            (
                "public_url",
                Box::new(|c| c.public_url = Some("http://x".into())),
            ),
            (
                "database_url",
                Box::new(|c| c.database_url = Some("mysql://x".into())),
            ),
            (
                "public_url",
                Box::new(|c| c.public_url = Some("https://ctl.example.test:7400".into())),
            ),
            ("ca_key", Box::new(|c| c.ca_key = Some("short".into()))),
            ("cert_lifetime_secs", Box::new(|c| c.cert_lifetime_secs = 0)),
            (
                "cert_lifetime_secs",
                Box::new(|c| c.cert_lifetime_secs = 8 * 24 * 3600),
            ),
            ("token_ttl_secs", Box::new(|c| c.token_ttl_secs = 0)),
            (
                "renew_grace_secs",
                Box::new(|c| c.renew_grace_secs = 30 * 24 * 3600 + 1),
            ),
            (
                "audit_retention_days",
                Box::new(|c| c.audit_retention_days = 36_501),
            ),
            (
                "max_pending_handshakes",
                Box::new(|c| c.max_pending_handshakes = 0),
            ),
            (
                "max_anonymous_connections",
                Box::new(|c| c.max_anonymous_connections = 0),
            ),
            (
                "anonymous_connection_secs",
                Box::new(|c| c.anonymous_connection_secs = 0),
            ),
            (
                "max_connections_per_peer",
                Box::new(|c| c.max_connections_per_peer = 0),
            ),
            (
                "anonymous_connection_secs",
                Box::new(|c| c.anonymous_connection_secs = 3601),
            ),
        ];
        for (field, f) in cases {
            let mut c = ControllerConfig::default();
            f(&mut c);
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, field);
            // The message a person reads names the field too.
            let shown = e.to_string();
            assert!(
                shown.contains(field) && shown.contains(&e.reason),
                "{shown}"
            );
        }
    }

    /// The public URL's host must be one the certificate names; the twins pass.
    #[test]
    fn the_public_urls_host_is_a_server_name() {
        for (url, names, ok) in [
            ("https://localhost:7400", vec!["localhost"], true),
            ("https://CTL.example.test/", vec!["ctl.example.test"], true),
            ("https://[::1]:7400", vec!["::1"], true),
            ("https://127.0.0.1", vec!["127.0.0.1"], true),
            ("https://localhost:7400", vec!["127.0.0.1"], false),
            ("https://ctl.example.test:7400/x", vec!["localhost"], false),
        ] {
            let c = ControllerConfig {
                public_url: Some(url.into()),
                server_names: names.into_iter().map(String::from).collect(),
                ..Default::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{url}");
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let c = ControllerConfig {
            ca_key: Some("ab".repeat(32)),
            database_url: Some("sqlite://secret-path".into()),
            ..Default::default()
        };
        let d = format!("{c:?}");
        assert!(!d.contains("abab"));
        assert!(!d.contains("secret-path"));
    }

    #[test]
    fn server_names() {
        assert!(valid_server_name("localhost"));
        assert!(valid_server_name("ctl.example.com"));
        assert!(valid_server_name("::1"));
        assert!(!valid_server_name("-bad.example"));
        assert!(!valid_server_name("a..b"));
    }
}
