//! The float64 reference against every golden case: routing exactly, logits, weights and
//! output to 1e-12 relative error.

use moe_core::conformance::{golden_dir, load_dir, rel_err};
use moe_core::reference;

#[test]
fn reference_matches_golden_to_1e12() {
    let dir = golden_dir();
    let cases = load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert!(!cases.is_empty());
    for case in &cases {
        let c = &case.config;
        let (routing, out) = reference::forward(c, &case.weights, &case.x, case.tokens).unwrap();
        assert_eq!(routing.topk_ids, case.expected.topk_ids, "{}: topk_ids", case.name);
        // The golden weights are the final combine weights, routed scale included.
        let w: Vec<f64> = routing.topk_weights.iter().map(|w| w * c.output_scale()).collect();
        let ew = rel_err(&w, &case.expected.topk_weights);
        let eo = rel_err(&out, &case.expected.out);
        let el = rel_err(&routing.logits, &load_logits(&dir, &case.name));
        println!("reference {:<24} logits {el:.1e} weights {ew:.1e} out {eo:.1e}", case.name);
        assert!(el <= 1e-12 && ew <= 1e-12 && eo <= 1e-12, "{}: {el} {ew} {eo}", case.name);
    }
}

fn load_logits(dir: &std::path::Path, name: &str) -> Vec<f64> {
    let bytes = std::fs::read(dir.join(format!("{name}.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    t.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn a_missing_or_empty_golden_folder_fails() {
    assert!(load_dir(std::path::Path::new("/nonexistent/golden")).is_err());
    let empty = std::env::temp_dir().join(format!("moe-empty-golden-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let err = load_dir(&empty).unwrap_err();
    assert!(err.contains("holds no case"), "{err}");
    std::fs::remove_dir_all(&empty).unwrap();
}
