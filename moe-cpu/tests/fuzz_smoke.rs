//! The fuzz harness bodies (`fuzz/src/lib.rs`) over random bytes and the committed corpus, so
//! the ordinary test suite exercises them on every CI run. `cargo fuzz run <target>` runs them
//! under libFuzzer.

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code, missing_docs)]
mod harness;

use moe_core::conformance::Rng;

fn inputs(target: &str, n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            all.push(std::fs::read(e.path()).unwrap());
        }
    }
    let mut r = Rng::new(seed);
    for _ in 0..n {
        let len = r.range(0, 600);
        all.push((0..len).map(|_| r.next_u64() as u8).collect());
    }
    all
}

#[test]
fn fuzz_smoke_validate() {
    for d in inputs("validate", 4000, 1) {
        harness::fuzz_validate(&d);
    }
}

#[test]
fn fuzz_smoke_plan() {
    for d in inputs("plan", 4000, 2) {
        harness::fuzz_plan(&d);
    }
}

#[test]
fn fuzz_smoke_forward() {
    let all = inputs("forward", 3000, 3);
    let ok: usize = all.iter().map(|d| harness::fuzz_forward(d)).sum();
    println!("{ok} successful forwards out of {} inputs x 3 dtypes", all.len());
    assert!(ok > 0, "the generator must reach the forward");
}
