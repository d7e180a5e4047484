"""Single-stream decode speed of packed weights on a MiniCPM4-0.5B-shaped model: our engine in bf16 vs INT4 vs
ternary (LM head float or packed), vs llama.cpp Q4_0 and TQ2_0 of the same weights (issue 9's goals).

    .venv/bin/python benchmarks/quant_speed.py --workdir build/bench [--repeats 3]

Model: the random 0.5B checkpoint of benchmarks/engine_speed.py (built once in --workdir). Ours: `minicpm4
quantize`'s code (quantize_ + save_model) writes each variant's folder; the engine (`LLM(folder, dtype=bfloat16)`)
runs it. INT4 = RTN, group 128, symmetric (GPTQ changes the codes, not the bytes or the speed); ternary = group 64.
llama.cpp: our F32 GGUF export of the float model, and of the ternary model's dequantized weights, quantized by
llama.cpp's own `llama_model_quantize` to Q4_0 / TQ2_0 (so llama.cpp picks its own types for the embedding/output
matrix, as a llama.cpp user gets them); bf16 KV cache, flash attention off, n_threads = --threads; speeds from
llama.cpp's own counters. Prompt --prompt-len random ids, --new-tokens greedy tokens, medians over --repeats,
systems interleaved per repeat. Weight bytes: the packed linears + head as stored. Writes
benchmarks/results/quant_speed.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, command_line, machine_info, median, publish, workdir_or_temp  # noqa: E402
from engine_speed import (EngineSystem, LlamaCppSystem, Unavailable, import_llama_cpp, make_prompt,  # noqa: E402
                          prepare_model)

from minicpm4.checkpoint import copy_tokenizer_files, load_model, save_model  # noqa: E402
from minicpm4.config import MiniCPMConfig  # noqa: E402
from minicpm4.quant import quantize_  # noqa: E402
from quant_kernels import VARIANTS  # noqa: E402

OURS = {f"ours {name}": config for name, config in VARIANTS.items()}  # the same variants as quant_kernels.py
LLAMA = {"llama.cpp Q4_0": ("float", "Q4_0"), "llama.cpp TQ2_0": ("ternary", "TQ2_0")}


def _folder(base: Path, workdir: Path, name: str, config) -> Path:
    if config is None:
        return base
    out = workdir / ("q-" + "".join(c if c.isalnum() else "-" for c in name))
    if not (out / "config.json").is_file():
        model = load_model(base, dtype=torch.bfloat16)
        quantize_(model, config)
        save_model(model, out)
        copy_tokenizer_files(base, out)
        del model
        gc.collect()
    return out


def _weight_bytes(folder: Path) -> int:
    """Bytes of everything a decode step reads once: all stored tensors but the embedding table (one row per
    token), plus the embedding again when it is also the float head (tied, no packed head)."""
    from safetensors import safe_open

    total, embed, head = 0, 0, False
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                t = h.get_slice(k)
                n = 1
                for d in t.get_shape():
                    n *= d
                size = n * {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "U8": 1, "I8": 1}[t.get_dtype()]
                if k == "model.embed_tokens.weight":
                    embed = n * 2  # the engine computes in bf16
                elif k.startswith("lm_head."):
                    head = True
                    total += size
                else:  # float tensors count at bf16 (the engine's dtype), packed ones as stored
                    total += size // 2 if t.get_dtype() == "F32" else size
    return total + (0 if head else embed)


def _llama_gguf(workdir: Path, source: Path, qtype: str) -> Path:
    ll = import_llama_cpp()
    from minicpm4.export.gguf import export_model_dir

    f32 = workdir / f"{source.name}-f32.gguf"
    if not f32.is_file():
        export_model_dir(source, f32, "f32")
    out = workdir / f"{source.name}-{qtype}.gguf"
    if not out.is_file():
        params = ll.llama_model_quantize_default_params()
        params.ftype = getattr(ll, f"LLAMA_FTYPE_MOSTLY_{qtype}")
        params.nthread = 2
        if ll.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize {qtype} failed")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="keeps the checkpoints and GGUF files for the next run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--systems", default=",".join([*OURS, *LLAMA]))
    p.add_argument("--out", default=str(RESULTS_DIR / "quant_speed.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    with workdir_or_temp(args.workdir, "quant-speed-") as workdir:
        base = prepare_model("0.5b", workdir)
        config = MiniCPMConfig.from_json(base / "config.json")
        folders = {name: _folder(base, workdir, name, OURS[name]) for name in chosen if name in OURS}
        systems, info, errors = {}, {}, {}
        for name in chosen:
            try:
                if name in OURS:
                    systems[name] = EngineSystem(folders[name], "bfloat16", args.threads)
                    info[name] = {"folder": str(folders[name]), "weight_bytes": _weight_bytes(folders[name])}
                else:
                    src, qtype = LLAMA[name]
                    source = base if src == "float" else _folder(base, workdir, "ours ternary (head bf16)",
                                                                 OURS["ours ternary (head bf16)"])
                    gguf_path = _llama_gguf(workdir, source, qtype)
                    n_ctx = max(1024, args.prompt_len + args.new_tokens)
                    systems[name] = LlamaCppSystem(gguf_path, "bfloat16", args.threads, n_ctx, "off")
                    info[name] = {"gguf": str(gguf_path), "file_bytes": gguf_path.stat().st_size}
                systems[name].run(make_prompt(config, 32, seed=99), 8)  # warm-up
            except (Unavailable, RuntimeError) as e:
                errors[name] = str(e)
                print(f"{name}: n/a ({e})", flush=True)
        runs = {name: [] for name in systems}
        order = list(systems)
        for r in range(args.repeats):
            prompt = make_prompt(config, args.prompt_len, seed=r)
            shift = r % max(len(order), 1)
            for name in order[shift:] + order[:shift]:
                run = systems[name].run(prompt, args.new_tokens)
                runs[name].append(run)
                print(f"repeat {r} {name:30s} prefill {run.prefill_tok_s:8.1f} decode {run.decode_tok_s:7.2f} tok/s", flush=True)
        for s in systems.values():
            s.close()
    rows = []
    for name in chosen:
        rs = runs.get(name, [])
        rows.append({"system": name, "decode_tok_s": median(r.decode_tok_s for r in rs) if rs else None,
                     "prefill_tok_s": median(r.prefill_tok_s for r in rs) if rs else None,
                     "decode_runs": [r.decode_tok_s for r in rs], **info.get(name, {}),
                     **({"error": errors[name]} if name in errors else {})})
    by = {r["system"]: r for r in rows}
    lines = ["| system | decode tok/s | prefill tok/s | bytes read per token (MiB) |", "|---|---|---|---|"]
    for r in rows:
        b = r.get("weight_bytes", r.get("file_bytes"))
        lines.append(f"| {r['system']} | {r['decode_tok_s'] or float('nan'):.1f} | {r['prefill_tok_s'] or float('nan'):.1f} | "
                     f"{(b or 0) / 2**20:,.0f}{' (GGUF file)' if 'file_bytes' in r else ''} |")
    result = {"command": command_line(argv), "machine": machine_info(args.threads), "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows, "table": "\n".join(lines)}
    for ours, theirs in (("ours int4 (head int4)", "llama.cpp Q4_0"), ("ours ternary (head ternary)", "llama.cpp TQ2_0")):
        a, b = by.get(ours, {}).get("decode_tok_s"), by.get(theirs, {}).get("decode_tok_s")
        if a and b:
            result[f"{ours} / {theirs}"] = a / b
    publish(result, args.out)
    return result


if __name__ == "__main__":
    main()
