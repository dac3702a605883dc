"""Runtime benchmark: tokens/s of transformers (fp32, NF4) and llama.cpp per quant type.

Every system scores the same tokens of the embedded demo text with the same windows (the rule
in edgefed.scoring), with and without the same rank-8 LoRA adapter on all projections, in one
run, so the ratios are comparable even on a noisy shared machine. Each figure is the best of
--repeats runs. llama.cpp runs each quant type with one context on all threads ("1 lane"), the
default type also with the runtime's default lanes (parallel contexts over one model); the
adapter is in the layout edgefed writes (rank padded to 16, float32) and, for comparison, in
the plain one (rank 8, float16: what edgefed wrote before).

It also measures the noise floor of trust scores: how far mathematically equal encodings of one
adapter score apart on each quant type, and the standard error of a mean loss over N tokens.
Usage:

    python bench/runtime.py [--tokens 2048] [--repeats 3] [--quants q4_1,q4_0,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgefed.demo_text import demo_evaluation_text
from edgefed.quant.gguf_file import embedded_base_path
from edgefed.quant.lora_gguf import convert_lora_to_gguf
from edgefed.quant.training_copy import build_training_model
from edgefed.runtime import DEFAULT_RUNTIME_QUANT, LlamaRuntime, requantize
from edgefed.runtime.llama import default_lanes, default_threads
from edgefed.train.perplexity import torch_perplexity

WINDOW = 512
LORA_RANK = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# mean-loss sample sizes whose standard error is reported: the demo's trust-validation size,
# bench/trust.py's, and the default of `edgefed round` (--val-tokens)
SE_SIZES = (256, 1024, 8192)
# encodings of one adapter that compute the same function: (label, out_type, rank_multiple)
LAYOUTS = (("fast", "f32", 16), ("r8 f16", "f16", 1), ("r8 f32", "f32", 1))


def random_lora(model, seed: int = 0):
    """A rank-8 PEFT LoRA with random non-zero A and B: a trained adapter's cost, not values."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model, LoraConfig(r=LORA_RANK, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return peft_model.eval()


def best_of(repeats: int, measure) -> tuple[float, float]:
    """(best tokens/s, mean NLL) over `repeats` runs of `measure()` -> PerplexityResult."""
    results = [measure() for _ in range(repeats)]
    return max(r.tokens_per_second for r in results), results[0].mean_nll


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def llama_rows(path, adapters, tokens, repeats, lanes, label) -> tuple[list[dict], dict]:
    """Throughput rows of one runtime file (and its adapters), with the noise figures."""
    rows, noise = [], {}
    before = rss_mib()
    with LlamaRuntime(path, window=WINDOW, lanes=lanes, cache_base_scores=False) as runtime:
        loaded = {name: runtime.load_adapter(p) for name, p in adapters.items()}
        runtime.perplexity(tokens[:600])  # warm-up: weight repacking, page cache, every lane
        runtime.perplexity(tokens[:600], loaded["fast"])
        plain = best_of(repeats, lambda: runtime.perplexity(tokens))
        for name, adapter in loaded.items():
            lora = best_of(repeats, lambda a=adapter: runtime.perplexity(tokens, a))
            noise[name] = lora[1]
            if name in ("fast", "r8 f16"):
                system = label + ("" if name == "fast" else " (r8 f16 adapter)")
                rows.append(
                    {
                        "system": system,
                        "lanes": runtime.lanes,
                        "tps": plain[0],
                        "tps_lora": lora[0],
                        "ppl": float(np.exp(plain[1])),
                    }
                )
        losses = -runtime.token_logprobs(tokens, loaded["fast"])[0]
        base_losses = -runtime.token_logprobs(tokens)[0]
        rows[0]["rss_mib"] = rss_mib() - before
    noise["std"] = float(losses.std(ddof=1))
    noise["paired_std"] = float((losses - base_losses).std(ddof=1))
    return rows, noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quants", default="q4_1,q4_0,q8_0,f16,q4_k_m,q5_k_m")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads = default_threads()
    torch.set_num_threads(threads)
    base = embedded_base_path()
    rows: list[dict] = []
    noise: dict[str, dict] = {}

    with LlamaRuntime(base, lanes=1) as runtime:
        tokens = runtime.tokenize(demo_evaluation_text(docs_per_topic=6))[: args.tokens]
    print(
        f"{len(tokens)} tokens of demo text, window {WINDOW}, stride {WINDOW // 2}, "
        f"{threads} threads, llama-cpp-python {__import__('llama_cpp').__version__}",
        file=sys.stderr,
    )

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = build_training_model(base, "fp32")
        peft_fp32 = random_lora(fp32)
        peft_fp32.save_pretrained(work / "lora")
        if not args.skip_torch:
            for label, model in (("transformers fp32", peft_fp32), ("transformers nf4", None)):
                if model is None:
                    del peft_fp32, fp32
                    model = random_lora(build_training_model(base, "nf4"))
                with model.disable_adapter():
                    plain = best_of(
                        args.repeats, lambda m=model: torch_perplexity(m, tokens, window=WINDOW)
                    )
                lora = best_of(
                    args.repeats, lambda m=model: torch_perplexity(m, tokens, window=WINDOW)
                )
                rows.append(
                    {
                        "system": label,
                        "lanes": "-",
                        "tps": plain[0],
                        "tps_lora": lora[0],
                        "ppl": float(np.exp(plain[1])),
                    }
                )
                print(f"{label} done", file=sys.stderr, flush=True)
            del model

        for quant in args.quants.split(","):
            path = base if quant == "q4_1" else requantize(base, work / f"{quant}.gguf", quant)
            adapters = {
                name: convert_lora_to_gguf(
                    work / "lora",
                    work / f"lora-{quant}-{name.replace(' ', '-')}.gguf",
                    base=path,
                    out_type=out_type,
                    rank_multiple=multiple,
                )
                for name, out_type, multiple in LAYOUTS
            }
            lane_counts = [1]
            if quant == DEFAULT_RUNTIME_QUANT and default_lanes(threads) > 1:
                lane_counts.append(default_lanes(threads))
            for lanes in lane_counts:
                found, noise[quant] = llama_rows(
                    path, adapters, tokens, args.repeats, lanes, f"llama.cpp {quant}"
                )
                rows.extend(found)
            print(f"{quant} done", file=sys.stderr, flush=True)

    # the cost of reading logits out: log-softmax over one window's scored rows, as the runtime does
    block = np.random.default_rng(0).standard_normal((WINDOW // 2, 49152)).astype(np.float32)
    started = time.perf_counter()
    for _ in range(10):
        block_max = block.max(axis=1)
        np.log(np.exp(block - block_max[:, None]).sum(axis=1))
    readout_ms = (time.perf_counter() - started) / 10 * 1000

    reference = next((r for r in rows if r["system"] == "transformers fp32"), None)
    print(
        f"{'system':<40}{'lanes':>6}{'tok/s':>8}{'+LoRA':>8}{'LoRA cost':>11}"
        f"{'x fp32':>8}{'x fp32+LoRA':>13}{'ppl':>8}"
    )
    for row in rows:
        row["lora_overhead"] = row["tps"] / row["tps_lora"] - 1
        if reference:
            row["x_fp32"] = row["tps"] / reference["tps"]
            row["x_fp32_lora"] = row["tps_lora"] / reference["tps_lora"]
        print(
            f"{row['system']:<40}{row['lanes']!s:>6}{row['tps']:>8.0f}{row['tps_lora']:>8.0f}"
            f"{row['lora_overhead']:>10.1%} {row.get('x_fp32', float('nan')):>8.2f}"
            f"{row.get('x_fp32_lora', float('nan')):>13.2f}{row['ppl']:>8.2f}"
        )
    print("\nmemory of a runtime above the process before it (last lane count of each type):")
    for row in rows:
        if "rss_mib" in row:
            print(f"  {row['system']:<38} lanes {row['lanes']}: {row['rss_mib']:,.0f} MiB")
    print(
        f"\nnoise floor: mean loss (nats) of equal encodings against the fast layout; standard "
        f"error of a mean loss over N tokens (std of per-token loss / sqrt N; paired: of the "
        f"difference adapter - base)\n{'quant':<8}{'r8 f16':>10}{'r8 f32':>10}"
        + "".join(f"{f'SE {n}':>9}" for n in SE_SIZES)
        + "".join(f"{f'paired {n}':>11}" for n in SE_SIZES)
    )
    for quant, figures in noise.items():
        deltas = [figures[name] - figures["fast"] for name in ("r8 f16", "r8 f32")]
        figures["delta_r8_f16"], figures["delta_r8_f32"] = deltas
        print(
            f"{quant:<8}{deltas[0]:>+10.5f}{deltas[1]:>+10.5f}"
            + "".join(f"{figures['std'] / np.sqrt(n):>9.4f}" for n in SE_SIZES)
            + "".join(f"{figures['paired_std'] / np.sqrt(n):>11.4f}" for n in SE_SIZES)
        )
    print(f"log-softmax readout of one window ({WINDOW // 2} rows x 49152): {readout_ms:.1f} ms")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "noise": noise,
                    "readout_ms": readout_ms,
                    "tokens": len(tokens),
                    "threads": threads,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
