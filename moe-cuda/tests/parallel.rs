//! Tensor and expert parallelism on the CUDA backend, ranks simulated in one process: each
//! rank's partial output (`forward_partial`) is computed on the GPU and the host sums them;
//! the sum must match the one-rank GPU result and the golden output (f32). Without a CUDA
//! driver or device each test prints why and passes.

mod common;

use moe_core::config::ExpertPlacement;
use moe_core::conformance::{golden_dir, load_dir, rel_err};
use moe_core::reference::{HostMlp, HostWeights};

fn sum_into(acc: &mut [f64], v: &[f64]) {
    acc.iter_mut().zip(v).for_each(|(a, b)| *a += b);
}

#[test]
fn conformance_tensor_parallel_sum() {
    let Some(r) = common::runner("conformance_tensor_parallel_sum") else { return };
    for case in load_dir(&golden_dir()).expect("golden cases") {
        let c = case.config;
        let world = 2;
        if !c.expert.mlp.intermediate.is_multiple_of(world)
            || c.shared.is_some_and(|s| !s.mlp.intermediate.is_multiple_of(world))
        {
            continue;
        }
        let mut sum = vec![0.0; case.tokens * c.hidden];
        for rank in 0..world {
            let mut rc = c;
            rc.parallel.tp_size = world;
            rc.parallel.tp_rank = rank;
            let shard = case.weights.shard_tp(&c, world, rank);
            let mut p = r.prepare::<f32>(&rc, &shard, &case.x, case.tokens).expect("prepare");
            r.forward_partial(&mut p).expect("forward_partial");
            sum_into(&mut sum, &r.read(&p).expect("read").out);
        }
        let e = rel_err(&sum, &case.expected.out);
        println!("tp[cuda] {:<24} ranks {world}: f32 rel err vs golden {e:.2e}", case.name);
        assert!(e <= 1e-5, "{}: tp={world} rel err {e}", case.name);
    }
}

fn slice_mlp(m: &HostMlp, lo: usize, hi: usize, inter: usize, width: usize) -> HostMlp {
    let rows = |v: &Vec<f64>, per: usize| v[lo * per..hi * per].to_vec();
    HostMlp {
        gate: m.gate.as_ref().map(|g| rows(g, inter * width)),
        up: rows(&m.up, inter * width),
        down: rows(&m.down, width * inter),
        gate_bias: m.gate_bias.as_ref().map(|b| rows(b, inter)),
        up_bias: m.up_bias.as_ref().map(|b| rows(b, inter)),
        down_bias: m.down_bias.as_ref().map(|b| rows(b, width)),
    }
}

#[test]
fn conformance_expert_parallel_sum() {
    let Some(r) = common::runner("conformance_expert_parallel_sum") else { return };
    for case in load_dir(&golden_dir()).expect("golden cases") {
        let c = case.config;
        let (e, world) = (c.experts, 2);
        if !e.is_multiple_of(world) {
            continue;
        }
        let per = e / world;
        let mut sum = vec![0.0; case.tokens * c.hidden];
        for rank in 0..world {
            let (lo, hi) = (rank * per, (rank + 1) * per);
            let mut rc = c;
            rc.parallel.experts =
                Some(ExpertPlacement { local_experts: per, include_shared: rank == 0 });
            let w = HostWeights {
                experts: slice_mlp(
                    &case.weights.experts,
                    lo,
                    hi,
                    c.local_intermediate(),
                    c.expert_width(),
                ),
                expert_map: Some(
                    (0..e)
                        .map(|g| if (lo..hi).contains(&g) { (g - lo) as i32 } else { -1 })
                        .collect(),
                ),
                ..case.weights.clone()
            };
            let mut p = r.prepare::<f32>(&rc, &w, &case.x, case.tokens).expect("prepare");
            r.forward(&mut p).expect("forward");
            sum_into(&mut sum, &r.read(&p).expect("read").out);
        }
        let e = rel_err(&sum, &case.expected.out);
        println!("ep[cuda] {:<24} ranks {world}: f32 rel err vs golden {e:.2e}", case.name);
        assert!(e <= 1e-5, "{}: ep={world} rel err {e}", case.name);
    }
}
