//! CSRs as the controller's CA checks and signs them at enrollment and renewal (`Ca::issue`):
//! never panics, and what is issued names exactly the identity granted, for the CSR's key.
//! Input: PEM text if it starts with `-----`, else DER (wrapped in PEM by the harness).
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness/pki.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::csr(data);
});
