//! Which transport a link uses, and the knobs shared by both.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// ALPN protocol id of Umbra links, on QUIC and on TLS over TCP alike.
pub const ALPN: &[u8] = b"umbra/1";

/// What a QUIC link may have sent and not yet acknowledged, over all its streams: the
/// sender's own memory bound, and enough for multi-Gbit/s on one link.
pub(crate) const QUIC_SEND_WINDOW: u64 = 16 * 1024 * 1024;

/// Largest per-stream window, in bytes (16 MiB).
const MAX_STREAM_WINDOW: u32 = 16 * 1024 * 1024;

/// Why a broker refused a link after its handshake (see [`crate::Link::refuse`]). Each has its
/// own close code on the wire (a QUIC application close code, and on TLS links the error code
/// of the multiplexer's GOAWAY), so that the dialer can tell "this identity may not connect" from
/// "this broker holds enough links for it" and act on each: stop, or try another broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The identity may not hold a link: its certificate, device or connector is revoked, or
    /// it is not enrolled. Every broker holds the same snapshot, so another broker says the same.
    Identity,
    /// The identity already holds as many links to this broker as the broker allows
    /// (`max_links_per_peer`). Another broker, or this one later, may take it.
    TooManyLinks,
}

impl Refusal {
    /// The close code that carries this refusal.
    pub(crate) const fn code(self) -> u32 {
        match self {
            Refusal::Identity => 0x554d_0001,
            Refusal::TooManyLinks => 0x554d_0002,
        }
    }

    /// The refusal a close code carries, if it is one.
    pub(crate) fn from_code(code: u32) -> Option<Refusal> {
        [Refusal::Identity, Refusal::TooManyLinks]
            .into_iter()
            .find(|r| r.code() == code)
    }

    /// The error a dialer's operations fail with after this refusal.
    pub fn error(self) -> crate::LinkError {
        match self {
            Refusal::Identity => crate::LinkError::Refused,
            Refusal::TooManyLinks => crate::LinkError::TooManyLinks,
        }
    }
}

/// Default receive window per stream, in KiB ([`LinkConfig::stream_window`]): what one stream
/// may have in flight towards a receiver, and so the most a receiver holds for it.
pub const DEFAULT_STREAM_WINDOW_KIB: u32 = 256;

/// Accepted per-stream windows, in KiB: from one TLS record up to 16 MiB.
pub const STREAM_WINDOW_KIB: std::ops::RangeInclusive<u32> = 16..=MAX_STREAM_WINDOW / 1024;

/// What a role configuration says of a `stream_window_kib` outside [`STREAM_WINDOW_KIB`].
pub const STREAM_WINDOW_KIB_ERROR: &str = "must be between 16 and 16384";

/// The per-stream window in bytes for a configured size in KiB; `None` outside
/// [`STREAM_WINDOW_KIB`]. Role configurations check their `stream_window_kib` with this.
pub fn stream_window_bytes(kib: u32) -> Option<u32> {
    STREAM_WINDOW_KIB.contains(&kib).then(|| kib * 1024)
}

/// The two transports behind [`crate::Link`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// QUIC (quinn), UDP.
    Quic,
    /// TLS 1.3 over TCP with Umbra's stream multiplexer (the fallback where UDP is
    /// blocked).
    Tls,
}

impl Transport {
    /// Name in logs, metrics and configuration: `"quic"` or `"tcp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tls => "tcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no transport.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown transport {0:?} (expected \"quic\" or \"tcp\")")]
pub struct UnknownTransport(pub String);

impl FromStr for Transport {
    type Err = UnknownTransport;
    /// Accepts `"quic"`, and `"tcp"` (or its alias `"tls"`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "quic" => Ok(Transport::Quic),
            "tcp" | "tls" => Ok(Transport::Tls),
            other => Err(UnknownTransport(other.to_owned())),
        }
    }
}

/// Timers and limits of links. The same values serve both transports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Deadline for a whole handshake: TCP connect or QUIC handshake, TLS, and on TLS links
    /// the multiplexer's HELLO.
    pub handshake_timeout: Duration,
    /// A link whose peer has not been heard from for this long is closed (QUIC idle
    /// timeout; on TLS links, a keepalive PING unanswered for this long).
    pub idle_timeout: Duration,
    /// Interval between keepalives (QUIC PING frames; the multiplexer's PINGs on TLS links).
    pub keepalive: Duration,
    /// Receive window per stream, in bytes: what one stream may have in flight towards this
    /// side, and so the most this side buffers for it (received, not yet read). A single
    /// stream's throughput is at most this per round trip: 256 KiB over a 50 ms path is about
    /// 40 Mbit/s. Role configurations set it from `stream_window_kib`
    /// ([`stream_window_bytes`]).
    pub stream_window: u32,
    /// Most streams the peer may have open at once on one link.
    pub max_streams: u32,
    /// Most handshakes a [`crate::Listener`] runs at once; further connections wait.
    pub max_pending_handshakes: usize,
    /// Listener only: the key QUIC stateless resets are derived from. Kept stable across
    /// restarts (the broker stores it next to its identity), it lets a restarted broker answer
    /// packets of connections it lost with a reset that peers recognise, so they reconnect at
    /// once instead of waiting for their idle timeout. `None`: a random key per process.
    pub reset_key: Option<ResetKey>,
}

/// Secret for QUIC stateless resets. Debug never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ResetKey(pub [u8; 32]);

impl std::fmt::Debug for ResetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetKey(..)")
    }
}

impl LinkConfig {
    /// The connection-level receive window of QUIC links: every stream's window at once (the
    /// TLS multiplexer has none). Streams whose reader has stopped then hold at most their own
    /// window each and never the link: on a link many users share (a connector's), one user
    /// who stops reading would otherwise stall everyone else's streams once their windows add
    /// up to the connection's. What a link buffers is bounded per stream instead, and how
    /// many streams a peer may hold is bounded by whoever accepts them (the broker's
    /// `max_streams_per_device`).
    pub(crate) fn connection_window(&self) -> u64 {
        u64::from(self.stream_window) * u64::from(self.max_streams.max(1))
    }

    /// This config with a per-stream window of `kib` KiB; a size outside
    /// [`STREAM_WINDOW_KIB`] (which role configurations refuse at load) keeps the current one.
    #[must_use]
    pub fn with_stream_window_kib(mut self, kib: u32) -> LinkConfig {
        if let Some(bytes) = stream_window_bytes(kib) {
            self.stream_window = bytes;
        }
        self
    }
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            keepalive: Duration::from_secs(5),
            stream_window: DEFAULT_STREAM_WINDOW_KIB * 1024,
            // A limit, not an allocation: what streams buffer is bounded per stream, and how
            // many one device holds by the broker (`max_streams_per_device`).
            max_streams: 65_536,
            max_pending_handshakes: 256,
            reset_key: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_codes_round_trip_and_differ() {
        let all = [Refusal::Identity, Refusal::TooManyLinks];
        for r in all {
            assert_eq!(Refusal::from_code(r.code()), Some(r));
            assert_eq!(r.error().refusal(), Some(r));
        }
        assert_ne!(Refusal::Identity.code(), Refusal::TooManyLinks.code());
        // Codes that are not ours (the multiplexer's own, a peer's) are no refusal.
        for code in [0, 8, 0x554d_0000, 0x554d_0003, u32::MAX] {
            assert_eq!(Refusal::from_code(code), None, "{code:#x}");
        }
    }

    #[test]
    fn names_round_trip() {
        for t in [Transport::Quic, Transport::Tls] {
            assert_eq!(t.as_str().parse::<Transport>(), Ok(t));
        }
        assert_eq!("tls".parse::<Transport>(), Ok(Transport::Tls));
        assert!("udp".parse::<Transport>().is_err());
    }

    #[test]
    fn the_connection_window_holds_every_stream_window() {
        let c = LinkConfig {
            max_streams: 1100,
            ..LinkConfig::default().with_stream_window_kib(16)
        };
        assert_eq!(c.connection_window(), 1100 * 16 * 1024);
        let d = LinkConfig::default();
        assert_eq!(d.connection_window(), 65_536 * 256 * 1024);
        let none = LinkConfig {
            max_streams: 0,
            ..LinkConfig::default()
        };
        assert_eq!(none.connection_window(), u64::from(none.stream_window));
    }

    #[test]
    fn stream_window_range() {
        assert_eq!(
            stream_window_bytes(DEFAULT_STREAM_WINDOW_KIB),
            Some(LinkConfig::default().stream_window)
        );
        assert_eq!(stream_window_bytes(16), Some(16 * 1024));
        assert_eq!(stream_window_bytes(16 * 1024), Some(MAX_STREAM_WINDOW));
        for bad in [0, 15, 16 * 1024 + 1, u32::MAX] {
            assert_eq!(stream_window_bytes(bad), None, "{bad} KiB");
            assert_eq!(
                LinkConfig::default().with_stream_window_kib(bad),
                LinkConfig::default()
            );
        }
        assert_eq!(
            STREAM_WINDOW_KIB_ERROR,
            format!(
                "must be between {} and {}",
                STREAM_WINDOW_KIB.start(),
                STREAM_WINDOW_KIB.end()
            )
        );
        let c = LinkConfig::default().with_stream_window_kib(1024);
        assert_eq!(c.stream_window, 1024 * 1024);
    }
}
