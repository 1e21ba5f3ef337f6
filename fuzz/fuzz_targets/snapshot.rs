//! Snapshots and API bodies arrive as JSON from the network: parsing never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<umbra_proto::Snapshot>(data);
    let _ = serde_json::from_slice::<umbra_proto::api::ConnectorConfig>(data);
    let _ = serde_json::from_slice::<umbra_proto::api::IssuedCert>(data);
    let _ = serde_json::from_slice::<umbra_proto::api::BrokerHeartbeat>(data);
});
