//! The golden conformance suite, the randomized property suite and a CUDA-graph replay test on
//! the CUDA backend. Without a CUDA driver or device each test prints why and passes.
//! `MOE_GOLDEN_DIR=<folder> cargo test -p moe-cuda --release conformance` runs another case set.

mod common;

use moe_core::DType;
use moe_core::conformance::ConformanceBackend;
use moe_core::conformance::{golden_dir, load_dir, rel_err, run_golden_suite, run_property_suite};

#[test]
fn conformance_golden() {
    let Some(r) = common::runner("conformance_golden") else { return };
    match run_golden_suite(&r) {
        Ok(n) => println!("{n} golden checks passed"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn conformance_property() {
    let Some(r) = common::runner("conformance_property") else { return };
    match run_property_suite(&r, 60, 0x5eed) {
        Ok(n) => println!("{n} property checks passed"),
        Err(e) => panic!("{e}"),
    }
}

/// Capture a whole forward of every golden case (bf16 and f32) into a CUDA graph, replay it
/// twice on a poisoned output, and require the result to be bitwise identical to a direct run.
#[test]
fn conformance_cuda_graph_replay() {
    let Some(r) = common::runner("conformance_cuda_graph_replay") else { return };
    let cases = load_dir(&golden_dir()).unwrap_or_else(|e| panic!("{e}"));
    for case in &cases {
        graph_case::<half::bf16>(&r, case);
        graph_case::<f32>(&r, case);
    }
}

fn graph_case<T: moe_cuda::CudaElement>(r: &common::Runner, case: &moe_core::conformance::Case)
where
    moe_cuda::CudaBackend: moe_core::MoeStages<T>,
{
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let mut p = r.prepare::<T>(&case.config, &case.weights, &case.x, case.tokens).expect("prepare");
    r.forward(&mut p).expect("direct forward");
    let direct = r.read(&p).expect("read direct");
    r.stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .expect("begin capture");
    let fwd = r.forward(&mut p);
    let graph = r.stream.end_capture(CUgraphInstantiate_flags(0)).expect("end capture");
    fwd.expect("captured forward");
    let graph = graph.expect("a graph");
    for replay in 0..2 {
        r.poison(&mut p).expect("poison");
        graph.launch().expect("graph launch");
        let got = r.read(&p).expect("read replay");
        let same = got.out.len() == direct.out.len()
            && got.out.iter().zip(&direct.out).all(|(a, b)| a.to_bits() == b.to_bits())
            && got.topk_ids == direct.topk_ids;
        println!(
            "graph[cuda] {:<24} {:<4} replay {replay}: {} (rel diff {:.1e})",
            case.name,
            T::DTYPE.name(),
            if same { "bitwise identical" } else { "DIFFERENT" },
            rel_err(&got.out, &direct.out)
        );
        assert!(same, "graph replay differs from the direct run for {}", case.name);
    }
    let _ = (DType::BF16, r.name());
}
