//! Request bodies the controller deserialises from peers (enroll, renew, heartbeat) and
//! administrators, and the enrollment token inside an enroll body: parsing never panics, and
//! what parses survives a JSON round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness/proto.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::api_request(data);
});
