//! The tensor-parallel reduce, simulated on the CPU: N ranks (threads) each hold 1/N of the
//! expert and shared intermediate dimensions; routed and shared partial sums are merged on each
//! rank and reduced by exactly one all-reduce, and the result equals the 1-rank layer.

use moe_core::conformance::{ElementWeights, golden_dir, load_dir, property_cases, rel_err};
use moe_core::reduce::SimulatedRanks;
use moe_core::reference::HostWeights;
use moe_core::*;
use moe_cpu::Cpu;

fn run_rank<C: Collective<Cpu, f32>>(
    c: &MoeConfig,
    w: &HostWeights,
    x: &[f32],
    tokens: usize,
    coll: &C,
) -> Result<(Vec<f32>, usize)> {
    let plan = MoePlan::new(c, tokens)?;
    let ew = ElementWeights::<f32>::from_host(w);
    let mut ws = vec![0xA5u8; plan.workspace_bytes(DType::F32)?];
    let mut out = vec![f32::NAN; tokens * c.hidden];
    let n = forward(&Cpu::new(), &plan, &ew.views::<Cpu>(), tokens, x, &mut out, &mut ws, coll)?
        .all_reduces();
    Ok((out, n))
}

fn tp_matches(name: &str, c: &MoeConfig, w: &HostWeights, x64: &[f64], tokens: usize) {
    let x: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
    let (one, n1) = run_rank(c, w, &x, tokens, &SingleRank).unwrap();
    assert_eq!(n1, 0, "one rank: no all-reduce");
    let one64: Vec<f64> = one.iter().map(|&v| v as f64).collect();
    for world in [2usize, 4] {
        if !c.expert.mlp.intermediate.is_multiple_of(world)
            || c.shared.is_some_and(|s| !s.mlp.intermediate.is_multiple_of(world))
        {
            continue;
        }
        let ranks = SimulatedRanks::new(world);
        let outs: Vec<(Vec<f32>, usize, usize)> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .enumerate()
                .map(|(rank, coll)| {
                    let (x, c, w) = (&x, *c, w);
                    s.spawn(move || {
                        let mut rc = c;
                        rc.parallel.tp_size = world;
                        rc.parallel.tp_rank = rank;
                        let shard = w.shard_tp(&c, world, rank);
                        let (o, n) = run_rank(&rc, &shard, x, tokens, coll).unwrap();
                        (o, n, coll.calls())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (o, n, calls)) in outs.iter().enumerate() {
            assert_eq!(
                (*n, *calls),
                (1, 1),
                "{name} tp={world} rank {rank}: exactly one all-reduce"
            );
            let o64: Vec<f64> = o.iter().map(|&v| v as f64).collect();
            let e = rel_err(&o64, &one64);
            assert!(e <= 1e-5, "{name} tp={world} rank {rank}: rel err {e}");
            if rank == 0 {
                println!(
                    "tp {name:<24} ranks {world}: rel err vs 1 rank {e:.2e}, all-reduces per rank 1"
                );
            }
        }
        assert!(outs.windows(2).all(|p| p[0].0 == p[1].0), "{name}: every rank holds the same sum");
    }
}

#[test]
fn tp_simulation_golden_cases() {
    for case in load_dir(&golden_dir()).unwrap() {
        tp_matches(&case.name, &case.config, &case.weights, &case.x, case.tokens);
    }
}

#[test]
fn tp_simulation_random_cases() {
    for case in property_cases(30, 0x7a7a) {
        // Make the intermediates divisible so that every case shards.
        let mut c = case.config;
        c.expert.mlp.intermediate = 8;
        if let Some(s) = &mut c.shared {
            s.mlp.intermediate = 12;
        }
        let w = moe_core::conformance::random_weights(&c, &mut moe_core::conformance::Rng::new(3));
        tp_matches(&case.name, &c, &w, &case.x, case.tokens);
    }
}

#[test]
fn collective_must_match_the_config() {
    let case = &load_dir(&golden_dir()).unwrap()[0];
    let x: Vec<f32> = case.x.iter().map(|&v| v as f32).collect();
    // tp_size 2 in the config, a single-rank collective: rejected before any work.
    let mut c = case.config;
    c.parallel.tp_size = 2;
    let shard = case.weights.shard_tp(&case.config, 2, 0);
    let err = run_rank(&c, &shard, &x, case.tokens, &SingleRank).unwrap_err();
    assert!(matches!(err, MoeError::CollectiveMismatch { expected_world: 2, got_world: 1 }));
    // A 2-rank collective for a 1-rank config: rejected as well.
    let ranks = SimulatedRanks::new(2);
    let err = run_rank(&case.config, &case.weights, &x, case.tokens, &ranks[0]).unwrap_err();
    assert!(matches!(err, MoeError::CollectiveMismatch { expected_world: 1, got_world: 2 }));
    assert_eq!(ranks[0].calls(), 0);
}

#[test]
fn merged_partial_sums_are_reduced_once() {
    // A caller's own partial sum (e.g. a row-parallel projection) merged into the layer's
    // partial output rides the same single all-reduce.
    let case = &load_dir(&golden_dir()).unwrap()[0];
    let c = case.config;
    let x: Vec<f32> = case.x.iter().map(|&v| v as f32).collect();
    let (t, h) = (case.tokens, c.hidden);
    let extra: Vec<f32> = (0..t * h).map(|i| ((i % 7) as f32 - 3.0) * 0.25).collect();
    let (full, _) = run_rank(&c, &case.weights, &x, t, &SingleRank).unwrap();
    let ranks = SimulatedRanks::new(2);
    let outs: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|rank| {
                let (x, extra, coll, case) = (&x, &extra, &ranks[rank], case);
                s.spawn(move || {
                    let mut rc = c;
                    rc.parallel.tp_size = 2;
                    rc.parallel.tp_rank = rank;
                    let shard = case.weights.shard_tp(&c, 2, rank);
                    let ew = ElementWeights::<f32>::from_host(&shard);
                    let plan = MoePlan::new(&rc, t).unwrap();
                    let mut ws = vec![0u8; plan.workspace_bytes(DType::F32).unwrap()];
                    let mut out = vec![f32::NAN; t * h];
                    // Each rank holds half of the caller's partial sum.
                    let mut mine: Vec<f32> = extra.iter().map(|v| v * 0.5).collect();
                    let cpu = Cpu::new();
                    let mut p =
                        forward_partial(&cpu, &plan, &ew.views::<Cpu>(), t, x, &mut out, &mut ws)
                            .unwrap();
                    p.merge(&cpu, Partial::from_unreduced(&mut mine[..])).unwrap();
                    let r = p.reduce(&cpu, coll).unwrap();
                    assert_eq!(r.all_reduces(), 1);
                    assert_eq!(coll.calls(), 1);
                    out
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let want: Vec<f64> = full.iter().zip(&extra).map(|(a, b)| (a + b) as f64).collect();
    for o in outs {
        let o: Vec<f64> = o.iter().map(|&v| v as f64).collect();
        assert!(rel_err(&o, &want) <= 1e-5);
    }
}
