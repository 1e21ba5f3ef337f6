//! Snapshots and the other JSON answers peers get from the controller (and the broker
//! heartbeat): parsing never panics, and what parses survives a JSON round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness/proto.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::snapshot(data);
});
