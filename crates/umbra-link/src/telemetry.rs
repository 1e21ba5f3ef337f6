//! Metric names and labels of this crate (the binary installs the recorder).
//!
//! - `umbra_links{transport}` gauge: links currently up.
//! - `umbra_link_handshake_failures_total{transport}` counter: failed handshakes, listening
//!   and dialing.
//! - `umbra_link_handshakes_evicted_total{reason}` counter: handshakes in progress cancelled
//!   for a newer connection (`pending.rs`): `source_share` (its source held its share of the
//!   slots) or `all_taken`. Steady counts mean a flood of connections, or too few slots.
//! - `umbra_relay_bytes_total{direction}` counter: bytes relayed, `up` (towards the service)
//!   and `down`.
//! - `umbra_quic_mtu_probes_total{result}` counter: path MTU probes of QUIC links, `sent` and
//!   `lost`, counted when a link closes. Lost probes on a working path mean its MTU is below
//!   the first hop's (a tunnel, or a router that drops instead of fragmenting).
//!
//! Handles are resolved once per link or relay, never per chunk: an increment on a handle is
//! one atomic add in the Prometheus recorder.

use metrics::{Counter, Gauge};

use crate::transport::Transport;

pub(crate) fn links(t: Transport) -> Gauge {
    metrics::gauge!("umbra_links", "transport" => t.as_str())
}

pub(crate) fn handshake_failed(t: Transport) {
    metrics::counter!("umbra_link_handshake_failures_total", "transport" => t.as_str())
        .increment(1);
}

/// Relay byte counters, (up, down).
pub(crate) fn relay_bytes() -> (Counter, Counter) {
    (
        metrics::counter!("umbra_relay_bytes_total", "direction" => "up"),
        metrics::counter!("umbra_relay_bytes_total", "direction" => "down"),
    )
}

/// Counts a closed QUIC link's MTU probes.
pub(crate) fn quic_link_closed(path: &quinn::PathStats) {
    metrics::counter!("umbra_quic_mtu_probes_total", "result" => "sent")
        .increment(path.sent_plpmtud_probes);
    metrics::counter!("umbra_quic_mtu_probes_total", "result" => "lost")
        .increment(path.lost_plpmtud_probes);
}
