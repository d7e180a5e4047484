"""Where the milliseconds of one decode step go: the reference model path vs FastDecoder, per op class.

Model: a random MiniCPM4-0.5B-shaped model (preset "minicpm4-0.5b": 24 layers, hidden 1024, 16/2 heads,
intermediate 4096, tied 73,448-token head; build_model(seed=0)), fp32 and bf16, --threads torch threads.
A step decodes N tokens (N sequences, one token each, all at position --context) and produces their
logits. Attention is the same in every path: the model's DenseAttention over a contiguous StaticKVCache
(pre-filled with random keys), called through the model's backend seam or FastDecoder's `attend`. That
attention runs on --attend-threads torch threads (default 1): on the shared 2-core dev box a 2-thread OpenMP
region inside these tiny ops waits for a scheduler slice whenever the other core is taken (measured at
load ~6: 7 ms -> 146 ms of attention per step), which would drown every other class; --attend-threads 0
runs it on --threads like the rest.

  reference    model(tokens[:, None], positions, kv_cache)  (minicpm4.generate.decode_one_token)
  fast_torch   FastDecoder(kernel=False): fused q|k|v and gate|up weights, F.linear, eager elementwise
  fast_kernel  FastDecoder(kernel=True): the C++ path (engine/fast_kernel.py)

Per-op profile: each path is also run instrumented, with perf_counter laps between its eager ops (CPU ops
are synchronous, so a lap is the op's time) or, for the C++ path, the kernel's own counters; the classes
are qkv, attention, o_proj, mlp (gate/up + down), norms/rope/elementwise (incl. residuals, SwiGLU),
lm_head, other (embedding, Python glue, q/k/v allocation). Step totals are timed uninstrumented. Paths run
interleaved within each repeat; medians over repeats (the dev box is shared: min is in the JSON too).

Side experiments in the same run (same-run ratios in the JSON): LM head variants (F.linear, matmul with a
transposed copy, vocab chunks, oneDNN prepacked, the kernel on 1 and 2 threads); each layer GEMV shape
through F.linear vs the kernel; a tokens-per-step sweep kernel vs PyTorch (the KERNEL_MAX_TOKENS
crossover, prefill chunks 128/512); torch.compile of the PyTorch path (--compile, compile time included).

    .venv/bin/python benchmarks/decode_step.py                      # fp32 + bf16, N = 1 and 16, 2 threads
    .venv/bin/python benchmarks/decode_step.py --dtypes bf16 --tokens 1 --repeats 5 --no-sweep
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info, median, write_results  # noqa: E402

from minicpm4.attention.dense import DenseAttention  # noqa: E402
from minicpm4.attention.metadata import AttentionMetadata  # noqa: E402
from minicpm4.config import preset  # noqa: E402
from minicpm4.engine import fast_forward, fast_kernel  # noqa: E402
from minicpm4.engine.fast_forward import FastDecoder, _rmsnorm, _rope  # noqa: E402
from minicpm4.kv_cache import StaticKVCache  # noqa: E402
from minicpm4.model import apply_rope, build_model  # noqa: E402

CLASSES = ["qkv", "attention", "o_proj", "mlp", "norms/rope/elementwise", "lm_head", "other"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Laps:
    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self.last = time.perf_counter()

    def __call__(self, cls: str) -> None:
        now = time.perf_counter()
        self.t[cls] += now - self.last
        self.last = now


def filled_cache(model, B: int, S: int) -> StaticKVCache:
    cache = StaticKVCache.for_model(model, B, S)
    g = torch.Generator().manual_seed(1)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g))
    return cache


class ThreadedAttention:
    """DenseAttention run on `threads` torch threads (then the previous count is restored; 0.1 us a switch)."""

    needs_pre_rope = False

    def __init__(self, threads: int) -> None:
        self.threads, self.dense = threads, DenseAttention()

    def __call__(self, *args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads or before)
        try:
            return self.dense(*args, **kwargs)
        finally:
            torch.set_num_threads(before)


def cache_attend(cache: StaticKVCache, pos: torch.Tensor, threads: int):
    """FastDecoder's attend over the same StaticKVCache + DenseAttention the reference path uses."""
    meta, dense = AttentionMetadata.for_cache(pos[:, None], cache), ThreadedAttention(threads)

    def attend(i, q, k, v):  # q [N, Hq, D] -> [N, Hq, 1, D]: one query per sequence
        return dense(i, q[:, :, None], k[:, :, None], v[:, :, None], meta)[:, :, 0]

    return attend


# ---- instrumented mirrors of each path (same ops as model.py / fast_forward.py, with laps in between) -------------
def reference_profiled(model, tok, pos, cache, lap: Laps) -> torch.Tensor:
    cfg, B = model.config, tok.shape[0]
    positions = pos[:, None]
    meta = AttentionMetadata.for_cache(positions, cache)
    cos, sin = model.rotary(positions, cache.max_seq_len)
    h = model.model.embed_tokens(tok[:, None]) * cfg.scale_emb
    lap("other")
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        x = layer.input_layernorm(h)
        lap("norms/rope/elementwise")
        q = a.q_proj(x).view(B, 1, a.num_heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(B, 1, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(B, 1, a.num_kv_heads, a.head_dim).transpose(1, 2)
        lap("qkv")
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        lap("norms/rope/elementwise")
        o = model.attention_backend(a.layer_idx, q, k, v, meta, None)
        lap("attention")
        o = a.o_proj(o.transpose(1, 2).reshape(B, 1, -1))
        lap("o_proj")
        h = h + o * layer.residual_scale
        x = layer.post_attention_layernorm(h)
        lap("norms/rope/elementwise")
        g, u = m.gate_proj(x), m.up_proj(x)
        lap("mlp")
        y = F.silu(g) * u
        lap("norms/rope/elementwise")
        y = m.down_proj(y)
        lap("mlp")
        h = h + y * layer.residual_scale
        lap("norms/rope/elementwise")
    h = model.model.norm(h)
    lap("norms/rope/elementwise")
    out = model.logits(h[:, 0])
    lap("lm_head")
    return out


def fast_torch_profiled(fd: FastDecoder, tok, pos, attend, lap: Laps) -> torch.Tensor:
    N, Hq, Hkv, D, eps, rs = tok.shape[0], fd.Hq, fd.Hkv, fd.D, fd.eps, fd.rs
    h = F.embedding(tok, fd.embed) * fd.config.scale_emb
    cos, sin = fd.cos[pos][:, None], fd.sin[pos][:, None]
    lap("other")
    for i, L in enumerate(fd.layers):
        x = _rmsnorm(h, L.in_norm, eps)
        lap("norms/rope/elementwise")
        qkv = F.linear(x, L.qkv).view(N, Hq + 2 * Hkv, D)
        lap("qkv")
        qk = _rope(qkv[:, : Hq + Hkv], cos, sin)
        q, k, v = qk[:, :Hq].contiguous(), qk[:, Hq:].contiguous(), qkv[:, Hq + Hkv:].contiguous()
        lap("norms/rope/elementwise")
        o = attend(i, q, k, v).reshape(N, Hq * D)
        lap("attention")
        o = F.linear(o, L.o)
        lap("o_proj")
        h = h + o * rs
        x = _rmsnorm(h, L.post_norm, eps)
        lap("norms/rope/elementwise")
        gate, up = F.linear(x, L.gate_up).chunk(2, dim=-1)
        lap("mlp")
        y = F.silu(gate) * up
        lap("norms/rope/elementwise")
        y = F.linear(y, L.down)
        lap("mlp")
        h = h + y * rs
        lap("norms/rope/elementwise")
    h = _rmsnorm(h, fd.final_norm, eps)
    lap("norms/rope/elementwise")
    out = fd.logits(h)
    lap("lm_head")
    return out


def fast_kernel_profiled(fd: FastDecoder, tok, pos, attend, lap: Laps) -> torch.Tensor:
    """The real FastDecoder call; the kernel counts its own op classes, attend is timed around the call."""
    lib, handle = fd.kernel.lib, fd.kernel.handle
    att = [0.0]

    def timed(i, q, k, v):
        t = time.perf_counter()
        o = attend(i, q, k, v)
        att[0] += time.perf_counter() - t
        return o

    lib.ff_profile(handle, 1, None)
    t0 = time.perf_counter()
    out = fd.logits(fd.hidden_states(tok, pos, timed))
    total = time.perf_counter() - t0
    c = (ctypes.c_int64 * 6)()
    lib.ff_profile(handle, 0, c)
    ns = [x * 1e-9 for x in c]
    parts = {"norms/rope/elementwise": ns[0], "qkv": ns[1], "o_proj": ns[2], "mlp": ns[3] + ns[4], "lm_head": ns[5],
             "attention": att[0]}
    parts["other"] = total - sum(parts.values())
    for k, v in parts.items():
        lap.t[k] += v
    return out


# ---- the profile ---------------------------------------------------------------------------------------------------
def profile_decode(model, dtype_name: str, N: int, context: int, repeats: int, attend_threads: int) -> dict:
    S = context + 1
    previous = model.set_attention_backend(ThreadedAttention(attend_threads))
    tok = torch.randint(3, model.config.vocab_size, (N,), generator=torch.Generator().manual_seed(N))
    pos = torch.full((N,), context)
    caches = {name: filled_cache(model, N, S) for name in ("reference", "fast_torch", "fast_kernel")}
    fds = {"fast_torch": FastDecoder(model, S, kernel=False), "fast_kernel": FastDecoder(model, S, kernel=True)}

    def plain(name):
        if name == "reference":
            return lambda: model(tok[:, None], positions=pos[:, None], kv_cache=caches[name])[:, 0]
        fd, att = fds[name], cache_attend(caches[name], pos, attend_threads)
        return lambda: fd.logits(fd.hidden_states(tok, pos, att))

    def profiled(name, lap):
        if name == "reference":
            return reference_profiled(model, tok, pos, caches[name], lap)
        fn = fast_torch_profiled if name == "fast_torch" else fast_kernel_profiled
        return fn(fds[name], tok, pos, cache_attend(caches[name], pos, attend_threads), lap)

    names = list(caches)
    steps: dict[str, list[float]] = {n: [] for n in names}
    parts: dict[str, list[dict]] = {n: [] for n in names}
    with torch.inference_mode():
        ref = plain("reference")()
        agree = {}
        for n in names:  # warm-up + numerics: logits against the reference, plain and instrumented
            out, out_p = plain(n)(), profiled(n, Laps())
            agree[n] = {"max_abs_diff_vs_reference": (out - ref).abs().max().item(),
                        "instrumented_max_abs_diff": (out_p - out).abs().max().item(),
                        "argmax_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item()}
        stolen0 = fast_kernel.library().ff_stolen()
        for r in range(repeats):
            for n in names[r % 3:] + names[: r % 3]:
                fn = plain(n)
                for _ in range(3):
                    t = time.perf_counter()
                    fn()
                    steps[n].append(time.perf_counter() - t)
                lap = Laps()
                profiled(n, lap)
                parts[n].append(dict(lap.t))
        stolen = fast_kernel.library().ff_stolen() - stolen0
    model.set_attention_backend(previous)
    result = {"dtype": dtype_name, "tokens": N, "context": context, "attend_threads": attend_threads or None,
              "numerics": agree, "stolen_chunks": stolen, "paths": {}}
    for n in names:
        med = {c: median(p.get(c, 0.0) for p in parts[n]) * 1e3 for c in CLASSES}
        result["paths"][n] = {
            "step_ms_median": median(steps[n]) * 1e3, "step_ms_min": min(steps[n]) * 1e3,
            "tok_per_s": N / median(steps[n]), "profile_ms_median": med,
            "profile_total_ms": median(sum(p.values()) for p in parts[n]) * 1e3}
    base = result["paths"]["reference"]["step_ms_median"]
    for n in names:
        result["paths"][n]["speedup_vs_reference"] = base / result["paths"][n]["step_ms_median"]
    return result


# ---- side experiments ---------------------------------------------------------------------------------------------
def interleaved(fns: dict, repeats: int, inner: int = 5) -> dict:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for r in range(repeats):
        for k, f in fns.items():
            for _ in range(inner):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: {"ms_median": median(v) * 1e3, "ms_min": min(v) * 1e3} for k, v in times.items()}


def kernel_handle(model, threads: int, max_tokens: int = 16) -> fast_kernel.KernelModel:
    """A kernel handle without layers, for ff_linear on any weight (scratch for max_tokens rows)."""
    cfg, dt = model.config, model.output_weight.dtype
    table = torch.zeros(1, cfg.head_dim)
    return fast_kernel.KernelModel(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                                   heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                                   head_dim=cfg.head_dim, dtype=dt, max_tokens=max_tokens, eps=cfg.rms_norm_eps,
                                   residual_scale=cfg.residual_scale, cos=table, sin=table, layers=[], threads=threads)


def lm_head_variants(model, repeats: int) -> dict:
    W = model.output_weight
    x = torch.randn(1, W.shape[1]).to(W.dtype)
    Wt = W.t().contiguous()
    k1, k2 = kernel_handle(model, 1), kernel_handle(model, 2)
    y = torch.empty(1, W.shape[0])
    out_mode = 2 if W.dtype == torch.bfloat16 else 0
    fns = {
        "F.linear": lambda: F.linear(x, W),
        "matmul_transposed_copy": lambda: torch.mm(x, Wt),
        "F.linear_8_vocab_chunks": lambda: torch.cat([F.linear(x, w) for w in W.chunk(8)], 1),
        "kernel_1_thread": lambda: k1.lib.ff_linear(k1.handle, x.data_ptr(), W.data_ptr(), y.data_ptr(), 1, W.shape[0],
                                                    W.shape[1], out_mode),
        "kernel_2_threads": lambda: k2.lib.ff_linear(k2.handle, x.data_ptr(), W.data_ptr(), y.data_ptr(), 1, W.shape[0],
                                                     W.shape[1], out_mode),
    }
    try:  # oneDNN with the weight prepacked into its blocked layout
        Wp = torch.ops.mkldnn._reorder_linear_weight(W, 1) if W.dtype == torch.bfloat16 else \
            torch.ops.mkl._mkl_reorder_linear_weight(W, 1)
        fns["onednn_prepacked"] = (lambda: torch.ops.mkldnn._linear_pointwise(x, Wp, None, "none", [], "")) \
            if W.dtype == torch.bfloat16 else (lambda: torch.ops.mkl._mkl_linear(x, Wp, W, None, 1))
        fns["onednn_prepacked"]()
    except (RuntimeError, AttributeError) as e:
        fns.pop("onednn_prepacked", None)
        print(f"  (oneDNN prepacked LM head not available: {str(e).splitlines()[0][:100]})")
    res = interleaved(fns, repeats)
    nbytes = W.numel() * W.element_size()
    for v in res.values():
        v["GB_per_s"] = nbytes / (v["ms_median"] * 1e-3) / 1e9
    return res


def linear_variants(model, N: int, repeats: int) -> dict:
    layer = model.model.layers[0]
    a, m = layer.self_attn, layer.mlp
    k2 = kernel_handle(model, 2)
    out = {}
    with torch.no_grad():
        weights = (("qkv", torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])), ("o_proj", a.o_proj.weight),
                   ("gate_up", torch.cat([m.gate_proj.weight, m.up_proj.weight])), ("down", m.down_proj.weight))
    for name, W in weights:
        x = torch.randn(N, W.shape[1]).to(W.dtype)
        y = torch.empty(N, W.shape[0], dtype=W.dtype)
        om = int(W.dtype == torch.bfloat16)
        res = interleaved({
            "F.linear": lambda: F.linear(x, W),
            "kernel_2_threads": lambda: k2.lib.ff_linear(k2.handle, x.data_ptr(), W.data_ptr(), y.data_ptr(), N,
                                                         W.shape[0], W.shape[1], om)}, repeats)
        res["ratio_F.linear_over_kernel"] = res["F.linear"]["ms_median"] / res["kernel_2_threads"]["ms_median"]
        out[f"{name} {tuple(W.shape)}"] = res
    return out


def tokens_sweep(model, sizes: list[int], repeats: int, attend_threads: int) -> dict:
    """hidden_states + logits of the last token of an N-token chunk of one sequence, kernel vs PyTorch."""
    res = {}
    big = FastDecoder(model, 1024, kernel=True, max_kernel_tokens=max(sizes))
    plain = FastDecoder(model, 1024, kernel=False)
    for N in sizes:
        tok = torch.randint(3, model.config.vocab_size, (N,))
        pos = torch.arange(N)
        dense = ThreadedAttention(attend_threads)
        meta = AttentionMetadata(positions=pos[None])

        def attend(i, q, k, v):
            return dense(i, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], meta)[0].transpose(0, 1)

        fns = {"torch": lambda: plain.logits(plain.hidden_states(tok, pos, attend)[-1:])}
        if N <= 128:
            fns["kernel"] = lambda: big.logits(big.hidden_states(tok, pos, attend)[-1:])
        with torch.inference_mode():
            r = interleaved(fns, repeats, inner=2 if N >= 128 else 3)
        if "kernel" in r:
            r["ratio_torch_over_kernel"] = r["torch"]["ms_median"] / r["kernel"]["ms_median"]
        res[N] = r
        print(f"  N={N}: " + ", ".join(f"{k} {v['ms_median']:.1f} ms" for k, v in r.items() if isinstance(v, dict)))
    return res


def compile_experiment(model, sizes: list[int], repeats: int, attend_threads: int) -> dict:
    t = time.perf_counter()
    comp = FastDecoder(model, 1024, kernel=False)
    comp._attn_in = torch.compile(fast_forward._attn_in, dynamic=True)
    comp._attn_out_mlp = torch.compile(fast_forward._attn_out_mlp, dynamic=True)
    plain = FastDecoder(model, 1024, kernel=False)
    res = {}
    for N in sizes:
        tok, pos = torch.randint(3, model.config.vocab_size, (N,)), torch.arange(N)
        dense, meta = ThreadedAttention(attend_threads), AttentionMetadata(positions=pos[None])

        def attend(i, q, k, v):
            return dense(i, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], meta)[0].transpose(0, 1)

        with torch.inference_mode():
            t1 = time.perf_counter()
            comp.hidden_states(tok, pos, attend)
            first = time.perf_counter() - t1 if N == sizes[0] else None
            r = interleaved({"eager": lambda: plain.hidden_states(tok, pos, attend),
                             "compiled": lambda: comp.hidden_states(tok, pos, attend)}, repeats, inner=2)
        r["ratio_eager_over_compiled"] = r["eager"]["ms_median"] / r["compiled"]["ms_median"]
        if first is not None:
            r["first_call_s_incl_compile"] = first + (t1 - t)
        res[N] = r
        print(f"  compile N={N}: eager {r['eager']['ms_median']:.1f} ms, compiled {r['compiled']['ms_median']:.1f} ms")
    return res


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines.append(f"\n{r['dtype']}, N={r['tokens']} tokens/step, context {r['context']}, stolen chunks {r['stolen_chunks']}")
        names = list(r["paths"])
        lines.append(f"{'op class (ms, median)':26s}" + "".join(f"{n:>14s}" for n in names))
        for c in CLASSES + ["profile_total_ms"]:
            vals = [r["paths"][n]["profile_ms_median"][c] if c in CLASSES else r["paths"][n][c] for n in names]
            lines.append(f"{c:26s}" + "".join(f"{v:14.2f}" for v in vals))
        for key in ("step_ms_median", "step_ms_min", "tok_per_s", "speedup_vs_reference"):
            lines.append(f"{key:26s}" + "".join(f"{r['paths'][n][key]:14.2f}" for n in names))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16], help="tokens (sequences) per decode step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=256, help="position of the decoded tokens (keys attended)")
    ap.add_argument("--attend-threads", type=int, default=1,
                    help="torch threads inside the (profiling) attention, every path alike; 0 = --threads")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sweep", nargs="*", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 512])
    ap.add_argument("--no-sweep", action="store_true", help="skip the side experiments")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile of the PyTorch path (minutes)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "decode_step.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    assert fast_kernel.library() is not None, "the FastDecoder kernel did not build on this machine"
    payload = {"command": command_line(), "machine": machine_info(args.threads),
               "kernel_bf16_dot_products": fast_kernel.has_bf16_dot(), "model": "minicpm4-0.5b (random, seed 0)",
               "decode": [], "side": {}}
    for name in args.dtypes:
        t = time.perf_counter()
        model = build_model(preset("minicpm4-0.5b"), dtype=DTYPES[name], seed=0).eval()
        print(f"{name}: model built in {time.perf_counter() - t:.0f} s", flush=True)
        for N in args.tokens:
            r = profile_decode(model, name, N, args.context, args.repeats, args.attend_threads)
            payload["decode"].append(r)
            print(table([r]), flush=True)
        if not args.no_sweep:
            side = payload["side"].setdefault(name, {})
            side["lm_head_1_token"] = lm_head_variants(model, args.repeats)
            print("  lm head: " + ", ".join(f"{k} {v['ms_median']:.2f} ms" for k, v in side["lm_head_1_token"].items()))
            side["linear"] = {N: linear_variants(model, N, args.repeats) for N in (1, 16)}
            side["tokens_sweep"] = tokens_sweep(model, args.sweep, max(3, args.repeats // 2), args.attend_threads)
            if args.compile:
                side["compile"] = compile_experiment(model, [1, 16, 128, 512], max(3, args.repeats // 2), args.attend_threads)
        write_results(args.out, payload)
        del model
    print(f"\nwrote {write_results(args.out, payload)}")


if __name__ == "__main__":
    main()
