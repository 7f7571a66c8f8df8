//! Multi-GPU layers over NCCL (feature `nccl`), two ranks on two GPUs, one thread per rank:
//!
//! * tensor parallel (TP = 2): `moe_core::forward` with an [`NcclCollective`]: exactly one
//!   all-reduce per layer, every rank's output equal to the one-GPU output;
//! * expert parallel (EP = 2) over the all-to-all ([`moe_cuda::ep::ExpertParallel`]): the tokens
//!   split between the ranks, no all-reduce, the concatenated outputs equal to the one-GPU output.
//!
//! On the golden cases (f32 and bf16) and random configurations (f32). `expert_parallel_single_rank`
//! runs the expert-parallel path on one GPU (a one-rank communicator). Without a CUDA driver,
//! without NCCL, or with fewer GPUs than a test needs, it prints why and passes.

mod common;

use common::Runner;
use cudarc::driver::CudaContext;
use moe_core::config::ExpertPlacement;
use moe_core::conformance::ConformanceBackend as _;
use moe_core::conformance::{Case, Force, golden_dir, load_dir, random_case, rel_err, tolerance};
use moe_core::reference::{HostMlp, HostWeights};
use moe_core::{DType, MoeConfig, MoeError};
use moe_cuda::ep::{EpLayout, ExpertParallel};
use moe_cuda::nccl::{NcclCollective, NcclElement, NcclId, nccl_available};
use moe_cuda::{CudaBackend, CudaElement, DevView, DevViewMut};
use std::sync::{Mutex, MutexGuard};

const WORLD: usize = 2;

/// The tests share the two GPUs: NCCL communicators used concurrently on the same GPUs by
/// different threads can deadlock, so the tests run one at a time (as with --test-threads=1).
static SERIAL: Mutex<()> = Mutex::new(());

/// The lock on the GPUs, or `None` (after printing why) where the test cannot run.
fn gpus(test: &str) -> Option<MutexGuard<'static, ()>> {
    gpus_n(test, WORLD)
}

/// As [`gpus`], for `world` GPUs.
fn gpus_n(test: &str, world: usize) -> Option<MutexGuard<'static, ()>> {
    if let Err(why) = moe_cuda::try_context(0) {
        println!("{test}: skipped: {why}");
        return None;
    }
    if !nccl_available() {
        println!("{test}: skipped: {}", moe_cuda::nccl::nccl_unavailable_reason());
        return None;
    }
    let n =
        std::panic::catch_unwind(CudaContext::device_count).ok().and_then(|r| r.ok()).unwrap_or(0);
    if (n as usize) < world {
        println!("{test}: skipped: {n} GPU(s), {world} needed");
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

/// A runner on GPU `ordinal` (its own stream, event tracking off as in `common::runner`).
fn runner_on(ordinal: usize) -> Result<Runner, String> {
    let ctx = moe_cuda::try_context(ordinal)?;
    // SAFETY: no slice exists yet in this context; each rank uses one stream only.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().map_err(|e| format!("new stream: {e:?}"))?;
    let backend = CudaBackend::new(stream.clone()).map_err(|e| e.to_string())?;
    Ok(Runner { ctx, stream, backend })
}

/// Run `f` on every rank, one thread per GPU, each with its runner and communicator.
fn on_ranks<R: Send>(
    world: usize,
    f: impl Fn(usize, &Runner, &NcclCollective) -> Result<R, MoeError> + Sync,
) -> Vec<R> {
    let id = NcclId::new().expect("nccl id");
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let f = &f;
                s.spawn(move || {
                    let r = runner_on(rank).expect("runner");
                    let comm = NcclCollective::new(&r.ctx, rank, world, &id).expect("comm");
                    f(rank, &r, &comm).expect("rank")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    })
}

/// The one-GPU output (GPU 0) in `dtype`.
fn single_gpu(case: &Case, dtype: DType) -> Vec<f64> {
    let r = runner_on(0).expect("runner");
    r.run(dtype, &case.config, &case.weights, &case.x, case.tokens).expect("1-GPU forward").out
}

fn tp_ok(c: &MoeConfig) -> bool {
    c.expert.mlp.intermediate.is_multiple_of(WORLD)
        && c.shared.is_none_or(|s| s.mlp.intermediate.is_multiple_of(WORLD))
}

/// TP = 2: every rank runs all tokens on its shard; one all-reduce; each rank's output.
fn tp_outputs<T: CudaElement>(case: &Case) -> Vec<(Vec<f64>, usize, usize)>
where
    CudaBackend: moe_core::MoeStages<T>,
{
    let c = case.config;
    on_ranks(WORLD, |rank, r, comm| {
        let mut rc = c;
        rc.parallel.tp_size = WORLD;
        rc.parallel.tp_rank = rank;
        let shard = case.weights.shard_tp(&c, WORLD, rank);
        let mut p = r.prepare::<T>(&rc, &shard, &case.x, case.tokens)?;
        let h = c.hidden;
        let before = comm.all_reduce_calls();
        let w = p.weights.views();
        let reduced = moe_core::forward(
            &r.backend,
            &p.plan,
            &w,
            p.tokens,
            DevView::of(&p.x).prefix(p.tokens * h),
            DevViewMut::of(&mut p.out).prefix(p.tokens * h),
            DevViewMut::of(&mut p.ws),
            comm,
        )?;
        let counted = reduced.all_reduces();
        let calls = comm.all_reduce_calls() - before;
        Ok((r.read(&p)?.out, counted, calls))
    })
}

fn slice_mlp(m: &HostMlp, experts: &[usize], inter: usize, width: usize) -> HostMlp {
    let rows = |v: &Vec<f64>, per: usize| -> Vec<f64> {
        experts.iter().flat_map(|&e| v[e * per..(e + 1) * per].iter().copied()).collect()
    };
    HostMlp {
        gate: m.gate.as_ref().map(|g| rows(g, inter * width)),
        up: rows(&m.up, inter * width),
        down: rows(&m.down, width * inter),
        gate_bias: m.gate_bias.as_ref().map(|b| rows(b, inter)),
        up_bias: m.up_bias.as_ref().map(|b| rows(b, inter)),
        down_bias: m.down_bias.as_ref().map(|b| rows(b, width)),
    }
}

/// EP over the all-to-all on `world` GPUs: rank r runs tokens r T / world .. (r + 1) T / world;
/// the outputs concatenated, with the all-reduce and all-to-all calls of each rank.
fn ep_outputs<T: CudaElement + NcclElement + cudarc::driver::ValidAsZeroBits>(
    case: &Case,
    world: usize,
) -> (Vec<f64>, Vec<(usize, usize)>)
where
    CudaBackend: moe_core::MoeStages<T>,
{
    let c = case.config;
    let (t, h) = (case.tokens, c.hidden);
    let split: Vec<usize> = (0..=world).map(|r| r * t / world).collect();
    let max_tokens = (0..world).map(|r| split[r + 1] - split[r]).max().unwrap_or(0);
    let layout = EpLayout::contiguous(c.experts, world).expect("layout");
    let parts = on_ranks(world, |rank, r, comm| {
        let mine = layout.experts_of(rank);
        let mut rc = c;
        rc.parallel.experts =
            Some(ExpertPlacement { local_experts: mine.len(), include_shared: true });
        let w = HostWeights {
            experts: slice_mlp(
                &case.weights.experts,
                &mine,
                c.local_intermediate(),
                c.expert_width(),
            ),
            expert_map: Some(layout.expert_map(rank)),
            ..case.weights.clone()
        };
        let tokens = split[rank + 1] - split[rank];
        let x = &case.x[split[rank] * h..split[rank + 1] * h];
        let mut p = r.prepare::<T>(&rc, &w, x, tokens)?;
        let mut ep = ExpertParallel::<T>::new(&r.stream, &rc, layout.clone(), rank, max_tokens)?;
        let (ar, a2a) = (comm.all_reduce_calls(), comm.all_to_all_calls());
        let wv = p.weights.views();
        let stats = ep.forward(
            &r.backend,
            comm,
            &p.plan,
            &wv,
            tokens,
            DevView::of(&p.x).prefix(tokens * h),
            DevViewMut::of(&mut p.out).prefix(tokens * h),
            DevViewMut::of(&mut p.ws),
        )?;
        assert_eq!(stats.all_reduces, 0);
        assert!(stats.sent_rows <= tokens * c.top_k);
        let calls = (comm.all_reduce_calls() - ar, comm.all_to_all_calls() - a2a);
        Ok((r.read(&p)?.out, calls))
    });
    let mut out = Vec::with_capacity(t * h);
    let mut calls = Vec::new();
    for (o, n) in parts {
        out.extend(o);
        calls.push(n);
    }
    (out, calls)
}

fn check_tp(case: &Case, dtype: DType) {
    let want = single_gpu(case, dtype);
    let ranks = match dtype {
        DType::F32 => tp_outputs::<f32>(case),
        DType::F16 => tp_outputs::<half::f16>(case),
        DType::BF16 => tp_outputs::<half::bf16>(case),
    };
    for (rank, (out, counted, calls)) in ranks.iter().enumerate() {
        let e = rel_err(out, &want);
        println!(
            "tp[nccl] {:<28} {dtype:?} rank {rank}: rel err vs 1 GPU {e:.2e}, all-reduces {calls}",
            case.name
        );
        assert_eq!((*counted, *calls), (1, 1), "{}: one all-reduce per layer", case.name);
        assert!(e <= tolerance(dtype), "{} {dtype:?} rank {rank}: rel err {e}", case.name);
    }
}

fn check_ep(case: &Case, dtype: DType, world: usize) {
    let want = single_gpu(case, dtype);
    let (out, calls) = match dtype {
        DType::F32 => ep_outputs::<f32>(case, world),
        DType::F16 => ep_outputs::<half::f16>(case, world),
        DType::BF16 => ep_outputs::<half::bf16>(case, world),
    };
    let e = rel_err(&out, &want);
    println!(
        "ep[nccl] {:<28} {dtype:?} ranks {world}: rel err vs 1 GPU {e:.2e}, calls {calls:?}",
        case.name
    );
    for (ar, a2a) in calls {
        assert_eq!(ar, 0, "{}: no all-reduce under expert parallelism", case.name);
        assert_eq!(a2a, 5, "{}: counts, dispatch (3, grouped), return", case.name);
    }
    // Each slot is computed by the same kernel and summed in the same order as on one GPU.
    assert!(e <= tolerance(dtype), "{} {dtype:?}: rel err {e}", case.name);
}

fn supported(c: &MoeConfig) -> bool {
    !matches!(c.router.reduce, moe_core::TopkReduce::Custom(_)) && c.experts <= 512
}

fn random_cases(n: u64) -> Vec<Case> {
    (0..n)
        .map(|s| random_case(0x5eed_0000 + s, Force::default()))
        .filter(|c| supported(&c.config))
        .collect()
}

#[test]
fn tensor_parallel_golden() {
    let Some(_gpus) = gpus("tensor_parallel_golden") else { return };
    for case in load_dir(&golden_dir()).expect("golden cases") {
        if !tp_ok(&case.config) || !supported(&case.config) {
            continue;
        }
        for dtype in [DType::F32, DType::BF16] {
            check_tp(&case, dtype);
        }
        // The golden output too (f32, same bound as the one-GPU conformance).
        let out = &tp_outputs::<f32>(&case)[0].0;
        let e = rel_err(out, &case.expected.out);
        assert!(e <= 1e-5, "{}: tp rel err vs golden {e}", case.name);
    }
}

#[test]
fn expert_parallel_golden() {
    let Some(_gpus) = gpus("expert_parallel_golden") else { return };
    for case in load_dir(&golden_dir()).expect("golden cases") {
        if case.config.experts < WORLD || !supported(&case.config) {
            continue;
        }
        for dtype in [DType::F32, DType::BF16] {
            check_ep(&case, dtype, WORLD);
        }
        let (out, _) = ep_outputs::<f32>(&case, WORLD);
        let e = rel_err(&out, &case.expected.out);
        assert!(e <= 1e-5, "{}: ep rel err vs golden {e}", case.name);
    }
}

#[test]
fn tensor_parallel_random() {
    let Some(_gpus) = gpus("tensor_parallel_random") else { return };
    for case in random_cases(24).iter().filter(|c| tp_ok(&c.config)) {
        check_tp(case, DType::F32);
    }
}

#[test]
fn expert_parallel_random() {
    let Some(_gpus) = gpus("expert_parallel_random") else { return };
    for case in random_cases(24).iter().filter(|c| c.config.experts >= WORLD) {
        check_ep(case, DType::F32, WORLD);
    }
}

#[test]
fn expert_parallel_one_rank_without_tokens() {
    // Rank 0 has no tokens (a batch of one token): it must still serve rank 1's slots.
    let Some(_gpus) = gpus("expert_parallel_one_rank_without_tokens") else { return };
    let case = random_case(7, Force { tokens: Some(1), experts: Some(8), ..Force::default() });
    if supported(&case.config) {
        check_ep(&case, DType::F32, WORLD);
    }
}

#[test]
fn expert_parallel_single_rank() {
    // One rank, one GPU (a one-rank NCCL communicator): the whole expert-parallel path (routing
    // read back, dispatch, gathers, the k = 1 expert pass, the return and the slot-order
    // combine) with the all-to-alls reduced to device copies. Runs on a one-GPU machine.
    let Some(_gpus) = gpus_n("expert_parallel_single_rank", 1) else { return };
    for case in load_dir(&golden_dir()).expect("golden cases") {
        if supported(&case.config) {
            check_ep(&case, DType::F32, 1);
            check_ep(&case, DType::BF16, 1);
        }
    }
    for case in random_cases(12) {
        check_ep(&case, DType::F32, 1);
    }
}

#[test]
fn all_to_all_moves_blocks() {
    // Rank r sends r + 1 + p rows of width 3 to rank p, filled with 100 r + p.
    let Some(_gpus) = gpus("all_to_all_moves_blocks") else { return };
    let world = WORLD;
    let got = on_ranks(world, |rank, r, comm| {
        let counts = |from: usize, to: usize| from + 1 + to;
        let send_counts: Vec<usize> = (0..world).map(|p| counts(rank, p)).collect();
        let recv_counts: Vec<usize> = (0..world).map(|p| counts(p, rank)).collect();
        let send: Vec<f32> =
            (0..world).flat_map(|p| vec![(100 * rank + p) as f32; 3 * counts(rank, p)]).collect();
        let send_d = common::upload(&r.stream, &send)?;
        let n: usize = recv_counts.iter().sum();
        let mut recv_d = common::upload(&r.stream, &vec![f32::NAN; 3 * n])?;
        comm.all_to_all(
            &r.stream,
            DevView::of(&send_d),
            &send_counts,
            DevViewMut::of(&mut recv_d),
            &recv_counts,
            3,
        )?;
        let host: Vec<f32> = r.stream.clone_dtoh(&recv_d).map_err(|e| MoeError::Device {
            backend: "test",
            what: "download",
            code: e.0 as i64,
        })?;
        let want: Vec<f32> =
            (0..world).flat_map(|p| vec![(100 * p + rank) as f32; 3 * counts(p, rank)]).collect();
        Ok(host == want)
    });
    assert!(got.iter().all(|&ok| ok), "all-to-all blocks: {got:?}");
}

#[test]
fn skips_cleanly() {
    // Always runs: the checks above must never panic on a machine without GPUs or NCCL.
    let _ = gpus("skips_cleanly");
}
