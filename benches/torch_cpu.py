#!/usr/bin/env python3
"""PyTorch CPU eager baseline for the moe-kernels CPU benches (run it through run_torch_cpu.sh).

The same layers as benches/src/cpu.rs (same shapes, scaled expert counts, routing rules and
activations), random weights, timed as two eager implementations:

* ``hf_loop``: the transformers-style block: one-hot expert mask, loop over the experts that
  got tokens, ``F.linear`` on the gathered tokens, ``index_add_`` into the output;
* ``matmul_loop``: tokens sorted by expert once, a per-expert ``torch.matmul`` loop over
  contiguous slices, one ``index_add_``.

Environment (same names as the Rust bench): MOE_BENCH_SHAPES, MOE_BENCH_T, MOE_BENCH_DTYPES,
MOE_BENCH_THREADS, MOE_BENCH_QUICK. Writes CSV rows
``shape,dtype,tokens,threads,variant,ms`` to ``--csv`` (default target/torch-cpu.csv).

With MOE_BENCH_BATON_IN and MOE_BENCH_BATON_OUT (two named pipes, set by compare_cpu.sh) it
takes turns with the Rust side (examples/report.rs): each layer build and each timed point waits
for a line on the first pipe and hands one on through the second when done.
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def silu_glu(g, u):
    return F.silu(g) * u


def swiglu_oai(g, u, alpha=1.702, limit=7.0):
    g = g.clamp(max=limit)
    u = u.clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


SHAPES = {
    # name: hidden, experts, top_k, intermediate, extra
    "qwen3_30b_a3b": dict(h=2048, e=128, k=8, i=768, route="softmax_renorm", act=silu_glu),
    "gpt_oss_120b_e32of128": dict(h=2880, e=32, k=4, i=2880, route="topk_softmax", act=swiglu_oai,
                                  bias=True),
    "mixtral_8x7b": dict(h=4096, e=8, k=2, i=14336, route="topk_softmax", act=silu_glu),
    "deepseek_v3_e32of256": dict(h=7168, e=32, k=8, i=2048, route="deepseek", act=silu_glu,
                                 n_group=8, topk_group=4, scale=2.5, shared=2048),
}


class Layer:
    def __init__(self, name, dtype):
        s = SHAPES[name]
        self.s = s
        h, e, i = s["h"], s["e"], s["i"]
        g = torch.Generator().manual_seed(7)

        def rnd(*shape, scale):
            return (torch.rand(*shape, generator=g, dtype=dtype) * 2 - 1) * scale

        self.router = rnd(e, h, scale=1 / math.sqrt(h))
        self.router_b = rnd(e, scale=0.2) if s.get("bias") else None
        self.sel_bias = rnd(e, scale=0.1).float() if s["route"] == "deepseek" else None
        self.wg = rnd(e, i, h, scale=1 / math.sqrt(h))
        self.wu = rnd(e, i, h, scale=1 / math.sqrt(h))
        self.wd = rnd(e, h, i, scale=1 / math.sqrt(i))
        if s.get("bias"):
            self.bg, self.bu, self.bd = rnd(e, i, scale=0.1), rnd(e, i, scale=0.1), rnd(e, h, scale=0.1)
        else:
            self.bg = self.bu = self.bd = None
        if s.get("shared"):
            si = s["shared"]
            self.sg = rnd(si, h, scale=1 / math.sqrt(h))
            self.su = rnd(si, h, scale=1 / math.sqrt(h))
            self.sd = rnd(h, si, scale=1 / math.sqrt(si))

    def route(self, x):
        s = self.s
        logits = F.linear(x, self.router, self.router_b).float()
        k = s["k"]
        if s["route"] == "softmax_renorm":
            p = logits.softmax(-1)
            w, idx = p.topk(k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
        elif s["route"] == "topk_softmax":
            v, idx = logits.topk(k, dim=-1)
            w = v.softmax(-1)
        else:  # DeepSeek-V3: sigmoid, selection bias, group-limited top-k, renorm, scale
            scores = logits.sigmoid()
            choice = scores + self.sel_bias
            t, e = choice.shape
            ng = s["n_group"]
            gs = choice.view(t, ng, e // ng).topk(2, dim=-1)[0].sum(-1)
            gidx = gs.topk(s["topk_group"], dim=-1)[1]
            gmask = torch.zeros_like(gs).scatter_(1, gidx, 1)
            smask = gmask.unsqueeze(-1).expand(t, ng, e // ng).reshape(t, e)
            choice = choice.masked_fill(~smask.bool(), 0.0)
            idx = choice.topk(k, dim=-1)[1]
            w = scores.gather(1, idx)
            w = w / (w.sum(-1, keepdim=True) + 1e-20) * s["scale"]
        return idx, w.to(x.dtype)

    def expert(self, e, xs):
        g = F.linear(xs, self.wg[e], None if self.bg is None else self.bg[e])
        u = F.linear(xs, self.wu[e], None if self.bu is None else self.bu[e])
        return F.linear(self.s["act"](g, u), self.wd[e], None if self.bd is None else self.bd[e])

    def shared(self, x, out):
        if self.s.get("shared"):
            out += F.linear(silu_glu(F.linear(x, self.sg), F.linear(x, self.su)), self.sd)
        return out

    def hf_loop(self, x):
        idx, w = self.route(x)
        out = torch.zeros_like(x)
        mask = F.one_hot(idx, num_classes=self.s["e"]).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = int(e[0])
            kk, tok = torch.where(mask[e])
            y = self.expert(e, x[tok]) * w[tok, kk, None]
            out.index_add_(0, tok, y.to(x.dtype))
        return self.shared(x, out)

    def matmul_loop(self, x):
        idx, w = self.route(x)
        k = self.s["k"]
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.s["e"]).tolist()
        tok = order // k
        xs = x[tok]
        ys = torch.empty_like(xs)
        a = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            seg = xs[a:a + n]
            g = torch.matmul(seg, self.wg[e].t())
            u = torch.matmul(seg, self.wu[e].t())
            if self.bg is not None:
                g, u = g + self.bg[e], u + self.bu[e]
            y = torch.matmul(self.s["act"](g, u), self.wd[e].t())
            if self.bd is not None:
                y = y + self.bd[e]
            ys[a:a + n] = y
            a += n
        out = torch.zeros_like(x)
        out.index_add_(0, tok, ys * w.flatten()[order, None])
        return self.shared(x, out)


def timeit(fn, quick):
    t0 = time.perf_counter()
    fn()  # warm up
    if time.perf_counter() - t0 > (2.0 if quick else 5.0):
        # Very slow points (bf16 eager at large T): one timed run after the warm-up.
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    times = []
    budget = 0.5 if quick else 2.0
    t_start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - t_start < budget and len(times) < 15):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


class Baton:
    """Turn-taking with the Rust side of a compare run; does nothing when the variables are unset."""

    def __init__(self):
        i, o = os.environ.get("MOE_BENCH_BATON_IN"), os.environ.get("MOE_BENCH_BATON_OUT")
        self.rx = open(i, "r") if i else None
        self.tx = open(o, "w") if o else None

    def hold(self, fn):
        if self.rx and not self.rx.readline():
            raise SystemExit("torch_cpu: the baton pipe closed")
        r = fn()
        if self.tx:
            self.tx.write("go\n")
            self.tx.flush()
        return r


def env_list(var, default):
    v = os.environ.get(var)
    return [s.strip() for s in v.split(",")] if v else default


def counts(var, default):
    """The positive integers of a comma-separated variable; exits with a message otherwise."""
    out = []
    for s in env_list(var, default):
        if not s.isdigit() or int(s) == 0:
            sys.exit(f"{var}: {s!r} is not a positive count")
        out.append(int(s))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "..", "target", "torch-cpu.csv"))
    args = ap.parse_args()
    quick = os.environ.get("MOE_BENCH_QUICK", "0") not in ("", "0")
    shapes = env_list("MOE_BENCH_SHAPES", list(SHAPES))
    tokens = counts("MOE_BENCH_T", ["1", "128"] if quick else ["1", "16", "128", "1024"])
    dtypes = env_list("MOE_BENCH_DTYPES", ["f32", "bf16"])
    threads = counts("MOE_BENCH_THREADS", ["2"] if quick else ["1", "2"])
    # Every selection is checked before the first point, like the Rust side (examples/report.rs):
    # a typo stops both sides here instead of running something else or nothing.
    dtype_of = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    for p in shapes:
        if not any(name.startswith(p) for name in SHAPES):
            sys.exit(f"MOE_BENCH_SHAPES: no shape starts with {p!r}")
    for d in dtypes:
        if d not in dtype_of:
            sys.exit(f"MOE_BENCH_DTYPES: unknown {d!r} (f32, bf16, f16)")
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    baton = Baton()
    with open(args.csv, "w") as f, torch.inference_mode():
        f.write("shape,dtype,tokens,threads,variant,ms\n")
        for name in SHAPES:
            if not any(name.startswith(p) for p in shapes):
                continue
            for d in dtypes:
                dt = dtype_of[d]
                layer = baton.hold(lambda: Layer(name, dt))
                for t in tokens:
                    x = (torch.rand(t, SHAPES[name]["h"], generator=torch.Generator().manual_seed(t)) * 2 - 1).to(dt)
                    for th in threads:

                        def point():
                            torch.set_num_threads(th)
                            for var in ("hf_loop", "matmul_loop"):
                                ms = timeit(lambda: getattr(layer, var)(x), quick)
                                row = f"{name},{d},{t},{th},{var},{ms:.4f}"
                                print(row, flush=True)
                                f.write(row + "\n")
                                f.flush()

                        baton.hold(point)
                del layer


if __name__ == "__main__":
    main()
