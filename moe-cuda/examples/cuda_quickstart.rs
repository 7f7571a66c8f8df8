//! CUDA quickstart: load a golden MoE block (DeepSeek-V3 by default; pass another case name or
//! set `MOE_GOLDEN_DIR`), run it on the GPU in bf16 on your own stream, capture the same forward
//! into a CUDA graph and replay it, and print the error against the golden output.
//! Prints a skip message and exits 0 on a machine without a CUDA driver or device.
//!
//! `cargo run --release -p moe-cuda --example cuda_quickstart [CASE]`

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use half::bf16;
use moe_core::conformance::{ElementWeights, golden_dir, load_case, rel_err};
use moe_core::*;
use moe_cuda::{CudaBackend, DevView, DevViewMut};

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> R<()> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "deepseek_v3".into());
    let case = load_case(&golden_dir().join(format!("{name}.json")))?;
    let ctx = match moe_cuda::try_context(0) {
        Ok(c) => c,
        Err(why) => {
            println!("quickstart: skipped: {why}");
            return Ok(());
        }
    };
    // One stream does all the work here, so cudarc's per-allocation event tracking (which would
    // also put event waits into a stream capture) is switched off before allocating.
    // SAFETY: nothing is allocated in this context yet, and everything below uses one stream.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream()?;
    // Loads the kernels once for this context.
    let backend = CudaBackend::new(stream.clone())?;
    let c = &case.config;
    let (t, h) = (case.tokens, c.hidden);
    // The plan validates the config and sizes the workspace (rows padded for the GPU GEMM).
    let plan = CudaBackend::plan(c, t)?;

    // Weights, input, output and workspace live in your own cudarc allocations.
    let ew = ElementWeights::<bf16>::from_host(&case.weights);
    let up = |v: &Vec<bf16>| stream.clone_htod(v);
    let (router, gate, upw, down) = (
        up(&ew.router)?,
        up(ew.experts.gate.as_ref().ok_or("gated case expected")?)?,
        up(&ew.experts.up)?,
        up(&ew.experts.down)?,
    );
    let sel_bias = ew.selection_bias.as_ref().map(|b| stream.clone_htod(b)).transpose()?;
    let shared = match &ew.shared {
        Some((m, g)) => Some((
            m.gate.as_ref().map(&up).transpose()?,
            up(&m.up)?,
            up(&m.down)?,
            g.as_ref().map(&up).transpose()?,
        )),
        None => None,
    };
    if ew.router_bias.is_some() || ew.experts.up_bias.is_some() || ew.latent.is_some() {
        println!(
            "quickstart: this example wires router, experts and shared expert only; pick another case"
        );
        return Ok(());
    }
    let x: Vec<bf16> = case.x.iter().map(|&v| bf16::from_f64(v)).collect();
    let x = stream.clone_htod(&x)?;
    let mut out = stream.clone_htod(&vec![bf16::NAN; t * h])?;
    let mut ws = stream.alloc_zeros::<u8>(plan.workspace_bytes(DType::BF16)?)?;

    let weights = MoeWeights::<CudaBackend, bf16> {
        router: DevView::of(&router),
        router_bias: None,
        selection_bias: sel_bias.as_ref().map(DevView::of),
        experts: MlpWeights {
            gate: Some(DevView::of(&gate)),
            up: DevView::of(&upw),
            down: DevView::of(&down),
            gate_bias: None,
            up_bias: None,
            down_bias: None,
        },
        shared: shared.as_ref().map(|(g, u, d, gw)| SharedWeights {
            mlp: MlpWeights {
                gate: g.as_ref().map(DevView::of),
                up: DevView::of(u),
                down: DevView::of(d),
                gate_bias: None,
                up_bias: None,
                down_bias: None,
            },
            gate: gw.as_ref().map(DevView::of),
        }),
        latent: None,
        expert_map: None,
    };
    let run = |out: &mut cudarc::driver::CudaSlice<bf16>,
               ws: &mut cudarc::driver::CudaSlice<u8>| {
        forward(
            &backend,
            &plan,
            &weights,
            t,
            DevView::of(&x),
            DevViewMut::of(out),
            DevViewMut::of(ws),
            &SingleRank,
        )
        .map(|_| ())
    };
    run(&mut out, &mut ws)?;
    let direct: Vec<bf16> = stream.clone_dtoh(&out)?;

    // The whole forward is capturable: no allocation, no host synchronization inside.
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let captured = run(&mut out, &mut ws);
    let graph = stream.end_capture(CUgraphInstantiate_flags(0))?;
    captured?;
    stream.memcpy_htod(&vec![bf16::NAN; t * h], &mut out)?;
    graph.ok_or("empty graph")?.launch()?;
    let replayed: Vec<bf16> = stream.clone_dtoh(&out)?;

    let to64 = |v: &[bf16]| v.iter().map(|x| x.to_f64()).collect::<Vec<_>>();
    println!(
        "moe-cuda quickstart on {}: {} ({} tokens, H {}, E {}, K {})",
        ctx.name()?,
        case.name,
        t,
        h,
        c.experts,
        c.top_k
    );
    println!(
        "  bf16 relative error vs golden: {:.2e}",
        rel_err(&to64(&direct), &case.expected.out)
    );
    println!(
        "  graph replay bitwise identical: {}",
        direct.iter().zip(&replayed).all(|(a, b)| a.to_bits() == b.to_bits())
    );
    Ok(())
}
