//! The agent's configuration: parsed with serde (unknown keys are errors), defaults for
//! everything, and [`AgentConfig::validate`] naming the field at fault.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use umbra_link::Transport;

/// Which transports to try when dialing a broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportPref {
    /// QUIC first, then TLS over TCP when QUIC fails (UDP blocked).
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP only.
    Tcp,
}

impl TransportPref {
    /// The transports to try, in order.
    pub fn order(self) -> &'static [Transport] {
        match self {
            TransportPref::Auto => &[Transport::Quic, Transport::Tls],
            TransportPref::Quic => &[Transport::Quic],
            TransportPref::Tcp => &[Transport::Tls],
        }
    }
}

impl TransportPref {
    /// The name used in configuration and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportPref::Auto => "auto",
            TransportPref::Quic => "quic",
            TransportPref::Tcp => "tcp",
        }
    }
}

impl fmt::Display for TransportPref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no transport preference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown transport {0:?} (expected \"auto\", \"quic\" or \"tcp\")")]
pub struct UnknownTransportPref(pub String);

impl FromStr for TransportPref {
    type Err = UnknownTransportPref;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(TransportPref::Auto),
            "quic" => Ok(TransportPref::Quic),
            "tcp" => Ok(TransportPref::Tcp),
            other => Err(UnknownTransportPref(other.to_owned())),
        }
    }
}

/// Configuration of an agent: the top-level keys of the TOML file given to `umbra agent --config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Directory holding `key.pem`, `cert.pem`, `ca.pem` and `controller.json` (written at
    /// enrollment). Default `$HOME/.config/umbra/agent`.
    pub identity_dir: PathBuf,
    /// `auto` (QUIC, falling back to TLS over TCP), `quic` or `tcp`.
    pub transport: TransportPref,
    /// Time the broker has to answer an `Open` (or a ping) before it is considered down.
    pub open_timeout_ms: u64,
    /// Time allowed for one link handshake with a broker (per transport tried).
    pub connect_timeout_ms: u64,
    /// A forwarded connection with no bytes either way for this long is closed.
    pub idle_timeout_secs: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            identity_dir: default_identity_dir(),
            transport: TransportPref::Auto,
            open_timeout_ms: 1_000,
            connect_timeout_ms: 1_000,
            idle_timeout_secs: 300,
        }
    }
}

/// `$HOME/.config/umbra/agent`, or `.config/umbra/agent` relative to the working directory
/// when `HOME` is unset. Read once, when the default configuration is built.
fn default_identity_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".config/umbra/agent")
}

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid agent configuration: {field}: {reason}")]
pub struct ConfigError {
    /// The field at fault, as spelled in the config file.
    pub field: &'static str,
    pub reason: &'static str,
}

const MAX_TIMEOUT_MS: u64 = 60_000;

impl AgentConfig {
    /// Checks every field; the error names the first one at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason| Err(ConfigError { field, reason });
        if self.identity_dir.as_os_str().is_empty() {
            return err("identity_dir", "must not be empty");
        }
        if self.open_timeout_ms == 0 || self.open_timeout_ms > MAX_TIMEOUT_MS {
            return err("open_timeout_ms", "must be between 1 and 60000");
        }
        if self.connect_timeout_ms == 0 || self.connect_timeout_ms > MAX_TIMEOUT_MS {
            return err("connect_timeout_ms", "must be between 1 and 60000");
        }
        if self.idle_timeout_secs == 0 {
            return err("idle_timeout_secs", "must be at least 1");
        }
        Ok(())
    }

    pub(crate) fn open_timeout(&self) -> Duration {
        Duration::from_millis(self.open_timeout_ms)
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_pref_parses_and_prints() {
        for t in [TransportPref::Auto, TransportPref::Quic, TransportPref::Tcp] {
            assert_eq!(t.to_string().parse::<TransportPref>(), Ok(t));
        }
        assert!("udp".parse::<TransportPref>().is_err());
        assert!("QUIC".parse::<TransportPref>().is_err());
    }

    #[test]
    fn transport_order() {
        assert_eq!(
            TransportPref::Auto.order(),
            &[Transport::Quic, Transport::Tls]
        );
        assert_eq!(TransportPref::Tcp.order(), &[Transport::Tls]);
        assert_eq!(TransportPref::Quic.order(), &[Transport::Quic]);
    }

    #[test]
    fn defaults() {
        let c = AgentConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.open_timeout(), Duration::from_secs(1));
        assert_eq!(c.connect_timeout(), Duration::from_secs(1));
        assert!(c.identity_dir.ends_with(".config/umbra/agent"));
    }

    #[test]
    fn parses_with_defaults_and_refuses_unknown_keys() {
        let c: AgentConfig =
            serde_json::from_str(r#"{"identity_dir":"/tmp/a","transport":"quic"}"#).unwrap();
        assert_eq!(c.transport, TransportPref::Quic);
        assert_eq!(c.open_timeout_ms, 1_000);
        assert!(serde_json::from_str::<AgentConfig>(r#"{"open_timeout":1}"#).is_err());
        assert!(serde_json::from_str::<AgentConfig>(r#"{"transport":"udp"}"#).is_err());
    }

    #[test]
    fn validate_names_the_field() {
        type Breaker = fn(&mut AgentConfig);
        let cases: [(Breaker, &str); 5] = [
            (|c| c.identity_dir = PathBuf::new(), "identity_dir"),
            (|c| c.open_timeout_ms = 0, "open_timeout_ms"),
            (|c| c.connect_timeout_ms = 0, "connect_timeout_ms"),
            (|c| c.connect_timeout_ms = 120_000, "connect_timeout_ms"),
            (|c| c.idle_timeout_secs = 0, "idle_timeout_secs"),
        ];
        for (break_it, field) in cases {
            let mut c = AgentConfig {
                identity_dir: PathBuf::from("/tmp/a"),
                ..AgentConfig::default()
            };
            break_it(&mut c);
            assert_eq!(c.validate().map_err(|e| e.field), Err(field));
        }
    }
}
