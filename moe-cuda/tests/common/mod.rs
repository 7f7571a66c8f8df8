//! Shared test support: a [`ConformanceBackend`] running whole layers on the CUDA backend, and
//! device copies of host weights. Every CUDA test calls [`runner`] first, which returns `None`
//! (after printing why) on a machine without a CUDA driver or device, so such tests pass there.
#![allow(dead_code)]

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr};
use moe_core::conformance::{
    ConformanceBackend, ElementMlp, ElementWeights, RunOutput, to_elements,
};
use moe_core::reference::HostWeights;
use moe_core::{
    DType, LatentWeights, MlpWeights, MoeConfig, MoeError, MoePlan, MoeWeights, SharedWeights,
    SingleRank, TopkReduce,
};
use moe_cuda::{CudaBackend, CudaElement, DevView, DevViewMut};
use std::sync::Arc;

/// The CUDA backend under test, on its own (non-default) stream.
pub struct Runner {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub backend: CudaBackend,
}

/// Every GEMM kernel choice the tests run: each kernel alone (the others off, so it serves
/// every GEMM it accepts) and the combined tunings (BEST, the default, and BEST with the TMA
/// variant of the wgmma kernel).
pub const TUNINGS: [moe_cuda::GemmTuning; 10] = {
    use moe_cuda::GemmTuning as G;
    let s = G::SIMPLE;
    [
        s,
        G { pipelined: true, ..s },
        G { pipelined: true, capped_gated: true, ..s },
        G { decode: true, ..s },
        G { wgmma: true, ..s },
        G { wgmma_tma: true, ..s },
        G::BEST,
        G { wgmma_tma: false, ..G::BEST },
        G { wgmma_multicast: true, ..s },
        G { wgmma_multicast: true, ..G::BEST },
    ]
};

/// A runner, or `None` (with a message) where there is no CUDA driver or device.
pub fn runner(test: &str) -> Option<Runner> {
    runner_with(test, moe_cuda::GemmTuning::default())
}

/// As [`runner`], with other GEMM kernel choices.
pub fn runner_with(test: &str, tuning: moe_cuda::GemmTuning) -> Option<Runner> {
    let ctx = match moe_cuda::try_context(0) {
        Ok(c) => c,
        Err(why) => {
            println!("{test}: skipped: {why}");
            return None;
        }
    };
    // SAFETY: no slice exists yet in this context; the tests use one stream only, so the
    // per-slice event tracking (which would also put event waits into graph captures) is
    // not needed.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().expect("new stream");
    let backend = CudaBackend::new(stream.clone()).expect("load kernels").with_tuning(tuning);
    println!("{test}: device {} ({tuning:?})", ctx.name().unwrap_or_default());
    Some(Runner { ctx, stream, backend })
}

fn dev(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> MoeError {
    move |e| MoeError::Device { backend: "cuda-test", what, code: e.0 as i64 }
}

/// Upload `v` (at least one element is allocated, so empty tensors work too).
pub fn upload<U: DeviceRepr + Copy + Default>(
    s: &Arc<CudaStream>,
    v: &[U],
) -> Result<CudaSlice<U>, MoeError> {
    if v.is_empty() { s.clone_htod(&[U::default()]) } else { s.clone_htod(v) }
        .map_err(dev("upload"))
}

/// Device copies of an MLP's tensors.
pub struct DevMlp<T> {
    pub gate: Option<CudaSlice<T>>,
    pub up: CudaSlice<T>,
    pub down: CudaSlice<T>,
    pub gate_bias: Option<CudaSlice<T>>,
    pub up_bias: Option<CudaSlice<T>>,
    pub down_bias: Option<CudaSlice<T>>,
}

/// Device copies of the latent fc1, fc2 and their biases.
pub type DevLatent<T> = (CudaSlice<T>, CudaSlice<T>, Option<CudaSlice<T>>, Option<CudaSlice<T>>);

/// Device copies of all weights of a layer.
pub struct DevWeights<T> {
    pub router: CudaSlice<T>,
    pub router_bias: Option<CudaSlice<T>>,
    pub selection_bias: Option<CudaSlice<f32>>,
    pub experts: DevMlp<T>,
    pub shared: Option<(DevMlp<T>, Option<CudaSlice<T>>)>,
    pub latent: Option<DevLatent<T>>,
    pub expert_map: Option<CudaSlice<i32>>,
}

fn up_opt<U: DeviceRepr + Copy + Default>(
    s: &Arc<CudaStream>,
    v: &Option<Vec<U>>,
) -> Result<Option<CudaSlice<U>>, MoeError> {
    v.as_ref().map(|v| upload(s, v)).transpose()
}

fn up_mlp<T: CudaElement>(s: &Arc<CudaStream>, m: &ElementMlp<T>) -> Result<DevMlp<T>, MoeError> {
    Ok(DevMlp {
        gate: up_opt(s, &m.gate)?,
        up: upload(s, &m.up)?,
        down: upload(s, &m.down)?,
        gate_bias: up_opt(s, &m.gate_bias)?,
        up_bias: up_opt(s, &m.up_bias)?,
        down_bias: up_opt(s, &m.down_bias)?,
    })
}

fn v<T>(s: &CudaSlice<T>) -> DevView<'_, T> {
    DevView::of(s)
}

fn mlp_views<T: CudaElement>(m: &DevMlp<T>) -> MlpWeights<'_, CudaBackend, T> {
    MlpWeights {
        gate: m.gate.as_ref().map(v),
        up: v(&m.up),
        down: v(&m.down),
        gate_bias: m.gate_bias.as_ref().map(v),
        up_bias: m.up_bias.as_ref().map(v),
        down_bias: m.down_bias.as_ref().map(v),
    }
}

impl<T: CudaElement> DevWeights<T> {
    /// Round `w` to `T` and upload it.
    pub fn upload(s: &Arc<CudaStream>, w: &HostWeights) -> Result<Self, MoeError> {
        let e = ElementWeights::<T>::from_host(w);
        Ok(DevWeights {
            router: upload(s, &e.router)?,
            router_bias: up_opt(s, &e.router_bias)?,
            selection_bias: up_opt(s, &e.selection_bias)?,
            experts: up_mlp(s, &e.experts)?,
            shared: match &e.shared {
                Some((m, g)) => Some((up_mlp(s, m)?, up_opt(s, g)?)),
                None => None,
            },
            latent: match &e.latent {
                Some(l) => Some((
                    upload(s, &l.fc1)?,
                    upload(s, &l.fc2)?,
                    up_opt(s, &l.fc1_bias)?,
                    up_opt(s, &l.fc2_bias)?,
                )),
                None => None,
            },
            expert_map: up_opt(s, &e.expert_map)?,
        })
    }

    /// Views for a forward.
    pub fn views(&self) -> MoeWeights<'_, CudaBackend, T> {
        MoeWeights {
            router: v(&self.router),
            router_bias: self.router_bias.as_ref().map(v),
            selection_bias: self.selection_bias.as_ref().map(v),
            experts: mlp_views(&self.experts),
            shared: self
                .shared
                .as_ref()
                .map(|(m, g)| SharedWeights { mlp: mlp_views(m), gate: g.as_ref().map(v) }),
            latent: self.latent.as_ref().map(|(f1, f2, b1, b2)| LatentWeights {
                fc1: v(f1),
                fc2: v(f2),
                fc1_bias: b1.as_ref().map(v),
                fc2_bias: b2.as_ref().map(v),
            }),
            expert_map: self.expert_map.as_ref().map(v),
        }
    }
}

/// Everything one forward needs on the device: weights, input, poisoned output and workspace.
pub struct Prepared<T> {
    pub plan: MoePlan,
    pub tokens: usize,
    pub weights: DevWeights<T>,
    pub x: CudaSlice<T>,
    pub out: CudaSlice<T>,
    pub ws: CudaSlice<u8>,
}

impl Runner {
    /// Upload a case and poison the output (NaN) and the workspace (0xFF bytes).
    pub fn prepare<T: CudaElement>(
        &self,
        config: &MoeConfig,
        weights: &HostWeights,
        x: &[f64],
        tokens: usize,
    ) -> Result<Prepared<T>, MoeError> {
        let plan = self.backend.make_plan(config, tokens)?;
        let layout = plan.layout(T::DTYPE)?;
        let weights = DevWeights::<T>::upload(&self.stream, weights)?;
        let xe: Vec<T> = to_elements(x);
        let x = upload(&self.stream, &xe)?;
        let out = upload(&self.stream, &vec![T::from_f32(f32::NAN); tokens * config.hidden])?;
        let ws = upload(&self.stream, &vec![0xFFu8; layout.total_bytes])?;
        Ok(Prepared { plan, tokens, weights, x, out, ws })
    }

    /// Poison the output again (NaN).
    pub fn poison<T: CudaElement>(&self, p: &mut Prepared<T>) -> Result<(), MoeError> {
        let n = p.out.len();
        self.stream.memcpy_htod(&vec![T::from_f32(f32::NAN); n], &mut p.out).map_err(dev("poison"))
    }

    /// Launch one forward on the runner's stream (no synchronization).
    pub fn forward<T: CudaElement>(&self, p: &mut Prepared<T>) -> Result<(), MoeError>
    where
        CudaBackend: moe_core::MoeStages<T>,
    {
        let h = p.plan.config().hidden;
        let w = p.weights.views();
        moe_core::forward(
            &self.backend,
            &p.plan,
            &w,
            p.tokens,
            DevView::of(&p.x).prefix(p.tokens * h),
            DevViewMut::of(&mut p.out).prefix(p.tokens * h),
            DevViewMut::of(&mut p.ws),
            &SingleRank,
        )?;
        Ok(())
    }

    /// Launch this rank's part of a forward (`forward_partial`, no reduce): the output holds
    /// the rank's partial sum, for tests that sum ranks on the host.
    pub fn forward_partial<T: CudaElement>(&self, p: &mut Prepared<T>) -> Result<(), MoeError>
    where
        CudaBackend: moe_core::MoeStages<T>,
    {
        let h = p.plan.config().hidden;
        let w = p.weights.views();
        let partial = moe_core::forward_partial(
            &self.backend,
            &p.plan,
            &w,
            p.tokens,
            DevView::of(&p.x).prefix(p.tokens * h),
            DevViewMut::of(&mut p.out).prefix(p.tokens * h),
            DevViewMut::of(&mut p.ws),
        )?;
        // The host sums the ranks' partial outputs in these tests.
        let _unreduced = partial;
        Ok(())
    }

    /// Read back the output and the routing (from the workspace).
    pub fn read<T: CudaElement>(&self, p: &Prepared<T>) -> Result<RunOutput, MoeError> {
        self.stream.synchronize().map_err(dev("synchronize"))?;
        let c = p.plan.config();
        let (t, k, h) = (p.tokens, c.top_k, c.hidden);
        let out: Vec<T> = self.stream.clone_dtoh(&p.out).map_err(dev("download out"))?;
        let ws: Vec<u8> = self.stream.clone_dtoh(&p.ws).map_err(dev("download workspace"))?;
        let layout = p.plan.layout(T::DTYPE)?;
        let base = {
            let ptr = DevView::of(&p.ws).device_ptr() as usize;
            (moe_core::REGION_ALIGN - ptr % moe_core::REGION_ALIGN) % moe_core::REGION_ALIGN
        };
        let word = |off: usize, i: usize| -> [u8; 4] {
            let a = base + off + 4 * i;
            [ws[a], ws[a + 1], ws[a + 2], ws[a + 3]]
        };
        Ok(RunOutput {
            topk_ids: (0..t * k)
                .map(|i| i32::from_le_bytes(word(layout.topk_ids.offset, i)))
                .collect(),
            topk_weights: (0..t * k)
                .map(|i| f32::from_le_bytes(word(layout.topk_weights.offset, i)) as f64)
                .collect(),
            out: out[..t * h].iter().map(|v| v.to_f64()).collect(),
        })
    }

    fn run_typed<T: CudaElement>(
        &self,
        config: &MoeConfig,
        weights: &HostWeights,
        x: &[f64],
        tokens: usize,
    ) -> Result<RunOutput, MoeError>
    where
        CudaBackend: moe_core::MoeStages<T>,
    {
        let mut p = self.prepare::<T>(config, weights, x, tokens)?;
        self.forward(&mut p)?;
        self.read(&p)
    }
}

impl ConformanceBackend for Runner {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn run(
        &self,
        dtype: DType,
        config: &MoeConfig,
        weights: &HostWeights,
        x: &[f64],
        tokens: usize,
    ) -> Result<RunOutput, MoeError> {
        match dtype {
            DType::F32 => self.run_typed::<f32>(config, weights, x, tokens),
            DType::F16 => self.run_typed::<half::f16>(config, weights, x, tokens),
            DType::BF16 => self.run_typed::<half::bf16>(config, weights, x, tokens),
        }
    }

    /// Documented limits: a user-supplied top-k reduce runs on the host only, and the fused
    /// router takes at most 512 experts.
    fn unsupported(&self, _dtype: DType, config: &MoeConfig) -> bool {
        matches!(config.router.reduce, TopkReduce::Custom(_)) || config.experts > 512
    }
}
