// Activations shared by expert_up and gemv (prepended to both bodies). They read the
// `act`, `gated`, `alpha` and `limit` fields of the module's parameter block `p`.
// Activations: 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu2, 4 swiglu_oai (alpha, limit).

fn sigm(v: f32) -> f32 {
    return 1.0 / (1.0 + exp(-v));
}

// Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7).
fn erf_(v: f32) -> f32 {
    let a = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let y = 1.0 - ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t
        + 0.254829592) * t * exp(-a * a);
    return select(y, -y, v < 0.0);
}

// tanh without overflow for large |v|.
fn tanh_(v: f32) -> f32 {
    let e = exp(-2.0 * abs(v));
    let r = (1.0 - e) / (1.0 + e);
    return select(r, -r, v < 0.0);
}

fn act1(v: f32) -> f32 {
    switch p.act {
        case 0u: {
            return v * sigm(v);
        }
        case 1u: {
            return 0.5 * v * (1.0 + erf_(v * 0.70710678118654752));
        }
        case 2u: {
            return 0.5 * v * (1.0 + tanh_(0.7978845608028654 * (v + 0.044715 * v * v * v)));
        }
        case 3u: {
            let r = max(v, 0.0);
            return r * r;
        }
        default: {
            return v;
        }
    }
}

fn hidden_of(g: f32, u: f32) -> f32 {
    if (p.act == 4u) {
        let gg = min(g, p.limit);
        let uu = clamp(u, -p.limit, p.limit);
        return (uu + 1.0) * gg * sigm(p.alpha * gg);
    }
    if (p.gated != 0u) {
        return act1(g) * u;
    }
    return act1(u);
}

