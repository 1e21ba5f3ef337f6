//! The connector's configuration: parsed with serde (unknown keys are errors), defaults for
//! everything, and [`ConnectorConfig::validate`] naming the field at fault.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
pub use umbra_link::{TransportPref, UnknownTransportPref};

/// Configuration of a connector: the top-level keys of the TOML file given to `umbra connector --config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectorConfig {
    /// Directory holding `key.pem`, `cert.pem`, `ca.pem`, `controller.json` (written at
    /// enrollment) and `published.json` (the cached published targets).
    pub identity_dir: PathBuf,
    /// `auto` (QUIC, falling back to TLS over TCP), `quic` or `tcp`.
    pub transport: TransportPref,
    /// Time allowed for a TCP connection to a published target.
    pub dial_timeout_ms: u64,
    /// A relayed connection with no bytes either way for this long is closed (checked every
    /// quarter of it). Default 3600, like the broker's: the shortest of the limits on a
    /// stream's path applies.
    pub idle_timeout_secs: u64,
    /// First delay before redialing a broker after a failure.
    pub reconnect_base_ms: u64,
    /// Longest delay between redials of a broker.
    pub reconnect_cap_ms: u64,
    /// Receive window per stream on broker links, in KiB (16 to 16384): the most this
    /// connector holds for one stream coming from a broker. A stream moves at most one window
    /// per round trip, so long paths to brokers need more (1024 KiB keeps about 80 Mbit/s per
    /// stream at 100 ms).
    pub stream_window_kib: u32,
    /// Streams one broker link may hold open at once (1 to 65536), each a connection to a
    /// target: a broker beyond it is refused more, so that one broker (compromised, or
    /// failing) cannot take every file descriptor and shut the others out.
    pub max_streams_per_link: u32,
}

impl Default for ConnectorConfig {
    fn default() -> Self {
        ConnectorConfig {
            identity_dir: PathBuf::from("/var/lib/umbra/connector"),
            transport: TransportPref::Auto,
            dial_timeout_ms: 5_000,
            idle_timeout_secs: 3_600,
            reconnect_base_ms: 250,
            reconnect_cap_ms: 30_000,
            stream_window_kib: umbra_link::DEFAULT_STREAM_WINDOW_KIB,
            max_streams_per_link: 4096,
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid connector configuration: {field}: {reason}")]
pub struct ConfigError {
    /// The field at fault, as spelled in the config file.
    pub field: &'static str,
    pub reason: &'static str,
}

/// Longest accepted target dial timeout: beyond this a caller (the agent) gave up long ago.
const MAX_DIAL_TIMEOUT_MS: u64 = 60_000;
/// Longest accepted reconnect cap: a connector must come back within minutes.
const MAX_RECONNECT_CAP_MS: u64 = 600_000;

impl ConnectorConfig {
    /// Checks every field; the error names the first one at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason| Err(ConfigError { field, reason });
        if self.identity_dir.as_os_str().is_empty() {
            return err("identity_dir", "must not be empty");
        }
        if self.dial_timeout_ms == 0 || self.dial_timeout_ms > MAX_DIAL_TIMEOUT_MS {
            return err("dial_timeout_ms", "must be between 1 and 60000");
        }
        if self.idle_timeout_secs == 0 {
            return err("idle_timeout_secs", "must be at least 1");
        }
        if umbra_link::stream_window_bytes(self.stream_window_kib).is_none() {
            return err("stream_window_kib", umbra_link::STREAM_WINDOW_KIB_ERROR);
        }
        if self.max_streams_per_link == 0 || self.max_streams_per_link > 65_536 {
            return err("max_streams_per_link", "must be between 1 and 65536");
        }
        if self.reconnect_base_ms == 0 {
            return err("reconnect_base_ms", "must be at least 1");
        }
        if self.reconnect_cap_ms < self.reconnect_base_ms
            || self.reconnect_cap_ms > MAX_RECONNECT_CAP_MS
        {
            return err(
                "reconnect_cap_ms",
                "must be at least reconnect_base_ms and at most 600000",
            );
        }
        Ok(())
    }

    pub(crate) fn dial_timeout(&self) -> Duration {
        Duration::from_millis(self.dial_timeout_ms)
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    pub(crate) fn reconnect_base(&self) -> Duration {
        Duration::from_millis(self.reconnect_base_ms)
    }

    pub(crate) fn reconnect_cap(&self) -> Duration {
        Duration::from_millis(self.reconnect_cap_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(ConnectorConfig::default().validate(), Ok(()));
    }

    #[test]
    fn parses_with_defaults_and_refuses_unknown_keys() {
        let c: ConnectorConfig =
            serde_json::from_str(r#"{"identity_dir":"/tmp/c","transport":"tcp"}"#).unwrap();
        assert_eq!(c.transport, TransportPref::Tcp);
        assert_eq!(c.dial_timeout_ms, 5_000);
        for (text, named) in [
            // A misspelt key is named, with the keys that exist.
            (r#"{"identity_dri":"/x"}"#, "`identity_dri`"),
            (r#"{"identity_dri":"/x"}"#, "identity_dir"),
            // A bad value is named, with the ones accepted.
            (r#"{"transport":"udp"}"#, "`udp`"),
            (r#"{"transport":"udp"}"#, "tcp"),
        ] {
            let e = serde_json::from_str::<ConnectorConfig>(text)
                .expect_err(text)
                .to_string();
            assert!(e.contains(named), "{text}: {e}");
        }
    }

    #[test]
    fn validate_names_the_field() {
        type Breaker = fn(&mut ConnectorConfig);
        let cases: [(Breaker, &str); 10] = [
            (|c| c.identity_dir = PathBuf::new(), "identity_dir"),
            (|c| c.max_streams_per_link = 0, "max_streams_per_link"),
            (|c| c.max_streams_per_link = 65_537, "max_streams_per_link"),
            (|c| c.dial_timeout_ms = 0, "dial_timeout_ms"),
            (|c| c.dial_timeout_ms = 600_000, "dial_timeout_ms"),
            (|c| c.idle_timeout_secs = 0, "idle_timeout_secs"),
            (|c| c.stream_window_kib = 15, "stream_window_kib"),
            (|c| c.stream_window_kib = 16_385, "stream_window_kib"),
            (|c| c.reconnect_base_ms = 0, "reconnect_base_ms"),
            (|c| c.reconnect_cap_ms = 1, "reconnect_cap_ms"),
        ];
        for (break_it, field) in cases {
            let mut c = ConnectorConfig::default();
            break_it(&mut c);
            let e = c.validate().expect_err(field);
            assert_eq!(e.field, field);
            // The message a person reads names the field too.
            let shown = e.to_string();
            assert!(shown.contains(field) && shown.contains(e.reason), "{shown}");
        }
    }
}
