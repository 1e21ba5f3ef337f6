//! Replays fuzz inputs under `cargo test`, without nightly or libFuzzer: every file of
//! `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/` (crashes a fuzzer found, kept as
//! regressions), then a fixed number of mutants of them made by a seeded generator (bit flips,
//! interesting bytes, length-field edits, truncations, deletions, duplications, splices) and a
//! few purely random inputs. Deterministic: the same inputs on every run.
//!
//! Included through `#[path]` by the `fuzz_corpus` tests of the crates that own the parsers;
//! the per-input checks live beside this file (`proto.rs`, `pki.rs`, `link.rs`) and are the
//! very functions the libFuzzer targets call.
//!
//! `UMBRA_FUZZ_REPLAY_MUTANTS=N` and `UMBRA_FUZZ_REPLAY_SEED=S` run more, or other, mutants.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Longest mutant, in bytes (libFuzzer's default `-max_len` is 4096).
const MAX_LEN: usize = 16 * 1024;

/// The repository's `fuzz/` directory, from the test crate's `crates/<name>/`.
pub(crate) fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Where a seed generator writes the inputs of `target`: `fuzz/corpus/<target>/` when
/// `UMBRA_FUZZ_WRITE_SEEDS=1` (regenerating the committed seeds), else an emptied scratch
/// directory under the system's temporary one, so that every test run exercises the
/// generators without touching the repository.
pub(crate) fn seed_dir(target: &str) -> PathBuf {
    let dir = if std::env::var("UMBRA_FUZZ_WRITE_SEEDS").is_ok_and(|v| v == "1") {
        fuzz_dir().join("corpus").join(target)
    } else {
        let d = std::env::temp_dir()
            .join(format!("umbra-fuzz-seeds-{}", std::process::id()))
            .join(target);
        let _ = fs::remove_dir_all(&d);
        d
    };
    fs::create_dir_all(&dir).expect("seed directory");
    dir
}

/// Feeds `check` every file in `dir` (what a seed generator wrote) and returns how many it
/// accepted; a panic fails the test, naming the file. Fails when `dir` holds nothing.
pub(crate) fn check_seeds(dir: &Path, check: impl Fn(&[u8]) -> bool) -> usize {
    let mut seen = 0;
    let mut accepted = 0;
    for e in fs::read_dir(dir).expect("seed directory") {
        let path = e.expect("readable directory entry").path();
        let bytes = fs::read(&path).expect("readable seed");
        seen += 1;
        let ok = panic::catch_unwind(AssertUnwindSafe(|| check(&bytes)))
            .unwrap_or_else(|_| panic!("the check panicked on seed {}", path.display()));
        assert_named_outcome(&path, ok);
        accepted += usize::from(ok);
    }
    assert!(seen > 0, "no seeds written to {}", dir.display());
    accepted
}

/// Every file under `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/`, sorted by path.
pub(crate) fn stored_inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["corpus", "artifacts"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let path = e.expect("readable directory entry").path();
            if path.is_file() {
                let bytes = fs::read(&path)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}

/// What a replay fed, and how many of those inputs the check accepted (parsed, invariants
/// held).
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    pub(crate) stored: usize,
    pub(crate) stored_accepted: usize,
    pub(crate) generated: usize,
    pub(crate) generated_accepted: usize,
}

/// Feeds `check` every stored input of `target`, then `mutants` generated ones. A panic in
/// `check` fails the test naming the input and saving it under the temporary directory, ready
/// for `cargo fuzz run <target> <file>` and for `fuzz/artifacts/<target>/`.
pub(crate) fn replay(target: &str, mutants: usize, check: impl Fn(&[u8]) -> bool) -> Replayed {
    let stored = stored_inputs(target);
    assert!(
        !stored.is_empty(),
        "no corpus for fuzz target {target} under {}",
        fuzz_dir().join("corpus").join(target).display()
    );
    let mut r = Replayed {
        stored: stored.len(),
        ..Replayed::default()
    };
    // Half of the mutants start from an input the check accepted: mutating what parses
    // reaches the invariants far more often than mutating what a fuzzer kept for coverage.
    let mut accepted: Vec<&[u8]> = Vec::new();
    for (path, bytes) in &stored {
        let ok = run_one(target, &path.display().to_string(), bytes, &check);
        assert_named_outcome(path, ok);
        if ok {
            accepted.push(bytes);
        }
    }
    r.stored_accepted = accepted.len();

    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let mutants = env("UMBRA_FUZZ_REPLAY_MUTANTS").map_or(mutants, |n| n as usize);
    let seed = env("UMBRA_FUZZ_REPLAY_SEED").unwrap_or(0);
    let mut rng = Rng(seed
        ^ target.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        }));
    let all: Vec<&[u8]> = stored.iter().map(|(_, b)| b.as_slice()).collect();
    for i in 0..mutants {
        let input = if i % 64 == 63 {
            let n = rng.below(256);
            rng.bytes(n)
        } else if i % 2 == 0 && !accepted.is_empty() {
            mutate(&mut rng, &accepted, &all)
        } else {
            mutate(&mut rng, &all, &all)
        };
        let what = format!("mutant {i} (seed {seed})");
        r.generated_accepted += usize::from(run_one(target, &what, &input, &check));
        r.generated += 1;
    }
    r
}

/// A seed named `seed-…-refused…` is one the product must refuse (a CSR asking for a CA
/// certificate, a P-521 key): the check must not accept it.
fn assert_named_outcome(path: &Path, accepted: bool) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    if name.starts_with("seed-") && name.contains("-refused") {
        assert!(
            !accepted,
            "{} was accepted, and must be refused",
            path.display()
        );
    }
}

fn run_one(target: &str, what: &str, input: &[u8], check: &impl Fn(&[u8]) -> bool) -> bool {
    if let Ok(accepted) = panic::catch_unwind(AssertUnwindSafe(|| check(input))) {
        return accepted;
    }
    let name = format!("umbra-fuzz-{target}-{:016x}", fnv(input));
    let saved = std::env::temp_dir().join(name);
    let where_ = match fs::write(&saved, input) {
        Ok(()) => format!("saved to {}", saved.display()),
        Err(e) => format!("not saved ({e})"),
    };
    let shown: String = input.iter().take(256).map(|b| format!("{b:02x}")).collect();
    panic!(
        "fuzz target {target}: {what} panicked ({} bytes, {where_}); first bytes: {shown}",
        input.len()
    );
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n`; 0 when `n` is 0.
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Bytes that matter to the formats fuzzed here: DER tags and length forms, big-endian length
/// edges, JSON punctuation, PEM and URI characters.
const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0c, 0x13, 0x16, 0x17, 0x18, 0x30, 0x31, 0x33, 0x7f,
    0x80, 0x81, 0x82, 0x83, 0x84, 0xa0, 0xa3, 0xfe, 0xff, b'"', b'{', b'}', b'[', b']', b',', b':',
    b'\\', b'0', b'9', b'-', b'.', b'e', b'n', b'u', b'/', b'=', b'\n', b' ',
];

/// One to four edits of one of `bases`, sometimes spliced with one of `others`.
fn mutate(rng: &mut Rng, bases: &[&[u8]], others: &[&[u8]]) -> Vec<u8> {
    let mut v = bases[rng.below(bases.len())].to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        let at = rng.below(len);
        match rng.below(9) {
            // Flip one bit.
            0 if len > 0 => v[at] ^= 1 << rng.below(8),
            // An interesting byte.
            1 if len > 0 => v[at] = INTERESTING[rng.below(INTERESTING.len())],
            // A length byte a little off (DER lengths, 8-bit string lengths).
            2 if len > 0 => {
                let d = [1u8, 2, 0xff, 0xfe, 0x80][rng.below(5)];
                v[at] = v[at].wrapping_add(d);
            }
            // A 16-bit big-endian length field set to an edge (frame and TLS lengths).
            3 if len > 1 => {
                let at = at.min(len - 2);
                let old = usize::from(u16::from_be_bytes([v[at], v[at + 1]]));
                let new = [0, 1, old + 1, old.saturating_sub(1), len, 0x7fff, 0xffff][rng.below(7)];
                v[at..at + 2].copy_from_slice(&(new.min(0xffff) as u16).to_be_bytes());
            }
            // Truncate.
            4 => v.truncate(at),
            // Delete a range.
            5 if len > 0 => {
                let end = (at + 1 + rng.below(32)).min(len);
                v.drain(at..end);
            }
            // Duplicate a range in place.
            6 if len > 0 => {
                let end = (at + 1 + rng.below(64)).min(len);
                let piece = v[at..end].to_vec();
                v.splice(at..at, piece);
            }
            // Insert random bytes.
            7 => {
                let n = 1 + rng.below(16);
                let piece = rng.bytes(n);
                v.splice(at..at, piece);
            }
            // Splice: our head, another input's tail.
            _ => {
                let other = others[rng.below(others.len())];
                let from = rng.below(other.len() + 1);
                v.truncate(at);
                v.extend_from_slice(&other[from..]);
            }
        }
        v.truncate(MAX_LEN);
    }
    v
}
