//! The controller's REST API as an administrator's client reaches it: any method, path,
//! query string and body, served by the real router on a real store. Never a panic or a 5xx,
//! refusals are JSON errors that change nothing, and nothing is served without the token.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness/admin_api.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::admin_api(data);
});
