//! The fuzz corpus of the `policy` target, replayed under `cargo test` (no nightly, no
//! libFuzzer): every file of `fuzz/corpus/policy/` and `fuzz/artifacts/policy/`, then seeded
//! mutants of them, through the same check the fuzz target runs (`fuzz/harness/policy.rs`).
//! See `fuzz/README.md`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../fuzz/harness/policy.rs"]
mod harness;
#[path = "../../../fuzz/harness/replay.rs"]
mod replay;

use umbra_policy::{PolicySubject, allow_policy};

#[test]
fn policy() {
    let r = replay::replay("policy", 3_000, harness::policy);
    eprintln!("policy: {r:?}");
    assert!(
        r.stored_accepted > 0,
        "no stored input is accepted: the invariants went unchecked"
    );
}

/// The `seed-*` inputs of `policy`: what `umbra admin policy add` writes for each kind of
/// subject, hand-written policies over every part of the schema (accepted), and texts the
/// controller refuses at write time (`-refused`, asserted refused). Written to a scratch
/// directory; `UMBRA_FUZZ_WRITE_SEEDS=1` writes them to `fuzz/corpus/policy/`.
#[test]
fn seed_generator_writes_policies_the_controller_stores_and_refuses() {
    let dir = replay::seed_dir("policy");
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(format!("seed-{name}.cedar")), text).unwrap();
    };
    write(
        "allow-user",
        &allow_policy(&PolicySubject::User("alice@example.test".into()), "demo"),
    );
    write(
        "allow-group",
        &allow_policy(&PolicySubject::Group("eng".into()), "wiki"),
    );
    write(
        "allow-everyone",
        &allow_policy(&PolicySubject::Everyone, "demo"),
    );
    write(
        "context",
        "permit (principal in Umbra::Group::\"eng\", action == Umbra::Action::\"connect\", \
         resource)\nwhen { context.transport == \"quic\" && context.now > 1700000000 };\n\
         forbid (principal, action, resource == Umbra::Service::\"wiki\")\n\
         unless { context.device == Umbra::Device::\"d-0123456789abcdef\" };\n",
    );
    write(
        "device-owner",
        "permit (principal, action == Umbra::Action::\"connect\", resource)\n\
         when { resource in [Umbra::Service::\"demo\", Umbra::Service::\"wiki\"] \
         && context.device.owner == principal };\n",
    );
    write(
        "forbid-user",
        "permit (principal, action, resource);\n\
         forbid (principal == Umbra::User::\"alice@example.test\", action, \
         resource == Umbra::Service::\"demo\");\n",
    );
    write("syntax-refused", "permit (principal, action, resource)");
    write(
        "template-refused",
        "permit (principal == ?principal, action, resource);",
    );
    write(
        "uppercase-user-refused",
        "permit (principal == Umbra::User::\"Alice@Example.test\", action, resource);",
    );
    write(
        "unknown-attribute-refused",
        "permit (principal, action, resource) when { context.location == \"home\" };",
    );
    write("empty-refused", "  \n// nothing\n");
    write(
        "bidi-refused",
        "permit (principal, action, resource == Umbra::Service::\"demo\u{202e}\");",
    );
    let accepted = replay::check_seeds(&dir, harness::policy);
    assert_eq!(accepted, 6, "accepted seeds");
}
