//! The fuzz targets' checks run on stable in `cargo test`: seed corpora plus a bounded number of deterministic pseudo-random and mutated inputs per target (libFuzzer runs the same checks for hours; see fuzz/README.md).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::Rng;

#[path = "../../fuzz/checks/header_parsing.rs"]
mod header_parsing;
#[path = "../../fuzz/checks/policy_decision.rs"]
mod policy_decision;
#[path = "../../fuzz/checks/purge_json.rs"]
mod purge_json;
#[path = "../../fuzz/checks/record_decode.rs"]
mod record_decode;

/// Inputs per target beyond the seeds; also stopped after `BUDGET`, so a slow machine cannot
/// stretch the suite.
const INPUTS: usize = 100_000;
const BUDGET: Duration = Duration::from_secs(5);

/// Tokens the parsers care about, spliced into inputs so that random bytes reach past the
/// first syntax check.
const DICTIONARY: &[&[u8]] = &[
    b"max-age=",
    b"s-maxage=",
    b"no-cache",
    b"no-store",
    b"private",
    b"public",
    b"must-revalidate",
    b"stale-while-revalidate=",
    b"stale-if-error=",
    b"immutable",
    b"\"",
    b",",
    b";",
    b"=",
    b"\n",
    b"vary:",
    b"cache-control:",
    b"accept-encoding",
    b"*",
    b"4294967296",
    b"2147483648",
    b"-1",
    b"{\"url\":\"http://h/p\"}",
    b"{\"prefix\":",
    b"\"soft\":true",
    b"[",
    b"]",
    b"\x00",
    b"\xff",
    b"\xc3\xa9",
];

/// A new input: random bytes, or a seed mutated a few times (flip, insert, delete, splice a
/// dictionary token, truncate, duplicate a slice).
fn input(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = if seeds.is_empty() || rng.index(4) == 0 {
        let len = rng.index(512);
        (0..len).map(|_| rng.next() as u8).collect()
    } else {
        seeds[rng.index(seeds.len())].clone()
    };
    for _ in 0..1 + rng.index(8) {
        let at = rng.index(data.len() + 1);
        match rng.index(6) {
            0 if !data.is_empty() => {
                let i = rng.index(data.len());
                data[i] ^= 1 << rng.index(8);
            }
            1 => data.insert(at, rng.next() as u8),
            2 if at < data.len() => {
                data.remove(at);
            }
            3 => {
                let token = DICTIONARY[rng.index(DICTIONARY.len())];
                data.splice(at..at, token.iter().copied());
            }
            4 => data.truncate(at),
            _ if at < data.len() => {
                let end = (at + rng.index(64)).min(data.len());
                let copy = data[at..end].to_vec();
                data.splice(at..at, copy);
            }
            _ => {}
        }
    }
    data
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Runs `check` on every seed, then on generated inputs; a panic names the input.
fn run(target: &str, seed: u64, check: fn(&[u8])) {
    let seeds = seeds(target);
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut ran = 0;
    let inputs = seeds
        .iter()
        .cloned()
        .chain(std::iter::from_fn(|| Some(input(&mut rng, &seeds))));
    for data in inputs.take(seeds.len() + INPUTS) {
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{target}: input #{ran} (seed {seed:#x}) broke a check: {:?}",
            String::from_utf8_lossy(&data)
        );
        ran += 1;
        if started.elapsed() > BUDGET {
            break;
        }
    }
    assert!(ran > seeds.len(), "{target}: only the seeds ran");
}

#[test]
fn header_parsing_holds_on_generated_inputs() {
    run(
        "header_parsing",
        0x9e37_79b9_7f4a_7c15,
        header_parsing::check,
    );
}

#[test]
fn policy_decision_holds_on_generated_inputs() {
    run(
        "policy_decision",
        0xd1b5_4a32_d192_ed03,
        policy_decision::check,
    );
}

#[test]
fn record_decode_holds_on_generated_inputs() {
    run("record_decode", 0x94d0_49bb_1331_11eb, record_decode::check);
}

#[test]
fn purge_json_holds_on_generated_inputs() {
    run("purge_json", 0xbf58_476d_1ce4_e5b9, purge_json::check);
}
