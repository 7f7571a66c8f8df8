"""PyTorch anchor for the moe-cuda bench: the expert MLPs of the same canonical shapes (bf16)
through `torch._grouped_mm` and through a per-expert `torch.matmul` loop, timed with CUDA
events, plus the GPU's copy bandwidth and bf16 matmul rate measured in the same run.

Routing is uniform random top-k (ids as a router would give them), rows pre-permuted; the
timed region is GEMM1 (gate|up fused) -> gated activation -> GEMM2 (and the shared expert for
DeepSeek-V3). Router, permute and combine are not included (an optimistic anchor).

Usage: python3 torch_anchor.py [--tokens 1,16,128,1024,4096,16384] [--models qwen3,...] [--csv FILE]
"""
import argparse
import sys

import torch
import torch.nn.functional as F

MODELS = [
    # name, H, I, E, K, activation, shared I
    ("qwen3-30b-a3b", 2048, 768, 128, 8, "silu", 0),
    ("gpt-oss-120b", 2880, 2880, 128, 4, "swiglu_oai", 0),
    ("mixtral-8x7b", 4096, 14336, 8, 2, "silu", 0),
    ("deepseek-v3", 7168, 2048, 256, 8, "silu", 2048),
]


def timed(fn, iters):
    fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(3):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        rounds.append(a.elapsed_time(b) / iters)
    return sorted(rounds)[1]


def act(h, i, kind):
    g, u = h[:, :i], h[:, i:]
    if kind == "swiglu_oai":
        g = g.clamp(max=7.0)
        u = u.clamp(-7.0, 7.0)
        return (u + 1) * g * torch.sigmoid(1.702 * g)
    return F.silu(g) * u


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    p.add_argument("--models", default="")
    p.add_argument("--csv", default="", help="also write model,T,path,ms,floor_ms rows here")
    a = p.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    want = [m for m in a.models.split(",") if m]
    dev = "cuda"
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    n = 1 << 31
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), 10)
    bw = 2 * n / (ms * 1e-3)
    del src, dst
    print(f"copy bandwidth (D2D, read + write): {bw / 1e9:.0f} GB/s")
    m = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    m2 = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = timed(lambda: m @ m2, 10)
    rate = 2 * 8192**3 / (ms * 1e-3)
    del m, m2
    print(f"torch bf16 matmul 8192^3: {rate / 1e12:.0f} TFLOP/s")
    rows = []
    for name, H, I, E, K, kind, IS in MODELS:
        if want and not any(name.startswith(w) for w in want):
            continue
        w13 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) / H**0.5
        w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) / I**0.5
        if IS:
            s13 = torch.randn(2 * IS, H, device=dev, dtype=torch.bfloat16) / H**0.5
            s2 = torch.randn(H, IS, device=dev, dtype=torch.bfloat16) / IS**0.5
        for T in tokens:
            ids = torch.randn(T, E, device=dev).topk(K, dim=1).indices.flatten()
            counts = torch.bincount(ids, minlength=E)
            offs = torch.cumsum(counts, 0).to(torch.int32)
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            xp = x[torch.argsort(ids, stable=True) // K].contiguous()
            touched = int((counts > 0).sum())
            flops = 2 * T * K * 3 * H * I + 2 * T * 3 * H * IS
            nbytes = touched * 3 * H * I * 2 + 3 * H * IS * 2 + 2 * T * H * 2
            floor = max(nbytes / bw, flops / rate)
            iters = max(3, min(100, int(0.2 / max(floor, 1e-6))))

            def shared():
                if IS:
                    hs = x @ s13.t()
                    return act(hs, IS, kind) @ s2.t()
                return None

            def grouped():
                h = torch._grouped_mm(xp, w13.transpose(-2, -1), offs=offs)
                y = torch._grouped_mm(act(h, I, kind), w2.transpose(-2, -1), offs=offs)
                shared()
                return y

            cl = counts.tolist()

            def loop():
                at = 0
                for e in range(E):
                    c = cl[e]
                    if c:
                        h = xp[at:at + c] @ w13[e].t()
                        _ = act(h, I, kind) @ w2[e].t()
                        at += c
                shared()

            res = {}
            for label, fn in (("grouped_mm", grouped), ("matmul loop", loop)):
                try:
                    res[label] = timed(fn, iters)
                except Exception as ex:  # report and go on
                    res[label] = float("nan")
                    print(f"{name} T={T} {label}: {type(ex).__name__}: {ex}", file=sys.stderr)
            for label, t in res.items():
                print(
                    f"{name:<14} T={T:<6} {label:<11} {t:9.3f} ms {flops / (t * 1e-3) / 1e12:7.1f} TFLOP/s "
                    f"{nbytes / (t * 1e-3) / 1e9:6.0f} GB/s floor {floor * 1e3:8.3f} ms = {100 * floor * 1e3 / t:5.1f}% of floor",
                    flush=True,
                )
                rows.append((name, T, label, t, floor * 1e3))
        del w13, w2
        if IS:
            del s13, s2
        torch.cuda.empty_cache()
    if a.csv:
        with open(a.csv, "w") as f:
            for name, T, label, t, fl in rows:
                f.write(f"{name},{T},{label},{t:.4f},{fl:.4f}\n")
    print("\n| model | T | torch path | ms | floor ms | % of floor |")
    print("|---|---|---|---|---|---|")
    for name, T, label, t, fl in rows:
        print(f"| {name} | {T} | {label} | {t:.3f} | {fl:.3f} | {100 * fl / t:.1f}% |")


if __name__ == "__main__":
    main()
