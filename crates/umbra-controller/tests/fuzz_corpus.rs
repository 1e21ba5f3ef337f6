//! The fuzz corpus of the `validate` target, replayed under `cargo test` (no nightly, no
//! libFuzzer): every file of `fuzz/corpus/validate/` and `fuzz/artifacts/validate/`, then
//! seeded mutants of them, through the same check the fuzz target runs
//! (`fuzz/harness/controller.rs`). See `fuzz/README.md`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../fuzz/harness/controller.rs"]
mod harness;
#[path = "../../../fuzz/harness/replay.rs"]
mod replay;

#[test]
fn validate() {
    let r = replay::replay("validate", 50_000, harness::validate);
    eprintln!("validate: {r:?}");
    assert!(
        r.stored_accepted > 0,
        "no stored input is accepted: the invariants went unchecked"
    );
}

/// The `seed-*` inputs of `validate`: values of each kind the controller stores, in the
/// spellings it keeps and the ones it normalises or refuses (`-refused`: no line accepted).
/// Written to a scratch directory; `UMBRA_FUZZ_WRITE_SEEDS=1` writes them to
/// `fuzz/corpus/validate/`.
#[test]
fn seed_generator_writes_values_the_controller_stores_and_refuses() {
    let dir = replay::seed_dir("validate");
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(format!("seed-{name}.txt")), text).unwrap();
    };
    write("names", "demo\nwiki-2\neng.team\ndc_1\nc-0123456789abcdef");
    write(
        "users",
        "alice@example.test\nBob.Smith@Example.TEST\nx+tag@sub.example.test",
    );
    write(
        "targets",
        "10.0.0.5:8080\nwiki.internal:443\n[2001:db8::1]:22\nlocalhost:5432",
    );
    write(
        "advertised",
        "[2001:0db8:0000::1]:7401\n[::ffff:10.0.0.5]:7401\n[::1]:7401",
    );
    write(
        "all-refused",
        "Demo\n-x\n010.0.0.5:80\n10.0.0.5:080\n[::ffff:10.0.0.5:80\nhost:0\nhost:65536\n\
         \u{202e}evil:80\nno port\n@example.test",
    );
    let accepted = replay::check_seeds(&dir, harness::validate);
    assert_eq!(accepted, 4, "accepted seeds");
}
