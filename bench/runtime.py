"""Runtime benchmark: tokens/s of transformers (fp32, NF4) and llama.cpp per quant type.

Every system scores the same tokens of the embedded demo text with the same windows (the rule
in edgefed.scoring), with and without the same rank-8 LoRA adapter on all projections, in one
run, so the ratios are comparable even on a noisy shared machine. Each figure is the best of
--repeats runs. Usage:

    python bench/runtime.py [--tokens 2048] [--repeats 3] [--quants q4_1,q4_0,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgefed.demo_text import demo_evaluation_text
from edgefed.quant.gguf_file import embedded_base_path
from edgefed.quant.lora_gguf import convert_lora_to_gguf
from edgefed.quant.nf4 import build_training_model
from edgefed.runtime import LlamaRuntime, requantize
from edgefed.runtime.llama import default_threads
from edgefed.train.perplexity import torch_perplexity

WINDOW = 512
LORA_RANK = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    """(best tokens/s, perplexity) over `repeats` runs of `measure()` -> PerplexityResult."""
    results = [measure() for _ in range(repeats)]
    return max(r.tokens_per_second for r in results), results[0].perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quants", default="q4_1,q4_0,q8_0,f16,q4_k_m,q5_k_m")
    parser.add_argument("--ubatch", default="512", help="comma-separated llama.cpp ubatch sizes")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads = default_threads()
    torch.set_num_threads(threads)
    base = embedded_base_path()
    rows: list[dict] = []

    with LlamaRuntime(base) as runtime:
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
            with peft_fp32.disable_adapter():
                plain = best_of(
                    args.repeats, lambda: torch_perplexity(peft_fp32, tokens, window=WINDOW)
                )
            lora = best_of(args.repeats, lambda: torch_perplexity(peft_fp32, tokens, window=WINDOW))
            rows.append(
                {
                    "system": "transformers fp32",
                    "tps": plain[0],
                    "tps_lora": lora[0],
                    "ppl": plain[1],
                }
            )
            del peft_fp32, fp32
            nf4 = random_lora(build_training_model(base, "nf4"))
            with nf4.disable_adapter():
                plain = best_of(args.repeats, lambda: torch_perplexity(nf4, tokens, window=WINDOW))
            lora = best_of(args.repeats, lambda: torch_perplexity(nf4, tokens, window=WINDOW))
            rows.append(
                {
                    "system": "transformers nf4",
                    "tps": plain[0],
                    "tps_lora": lora[0],
                    "ppl": plain[1],
                }
            )
            del nf4

        for quant in args.quants.split(","):
            path = base if quant == "q4_1" else requantize(base, work / f"{quant}.gguf", quant)
            adapter_path = convert_lora_to_gguf(
                work / "lora", work / f"lora-{quant}.gguf", base=path
            )
            for ubatch in (int(u) for u in args.ubatch.split(",")):
                with LlamaRuntime(path, window=WINDOW, ubatch=ubatch) as runtime:
                    adapter = runtime.load_adapter(adapter_path)
                    runtime.perplexity(tokens[:600])  # warm-up: weight repacking, page cache
                    plain = best_of(args.repeats, lambda: runtime.perplexity(tokens))
                    lora = best_of(args.repeats, lambda a=adapter: runtime.perplexity(tokens, a))
                label = f"llama.cpp {quant}" + (f" ubatch {ubatch}" if ubatch != 512 else "")
                rows.append(
                    {"system": label, "tps": plain[0], "tps_lora": lora[0], "ppl": plain[1]}
                )

    # the cost of reading logits out: log-softmax over one window's scored rows, as the runtime does
    block = np.random.default_rng(0).standard_normal((WINDOW // 2, 49152)).astype(np.float32)
    started = time.perf_counter()
    for _ in range(10):
        block_max = block.max(axis=1)
        np.log(np.exp(block - block_max[:, None]).sum(axis=1))
    readout_ms = (time.perf_counter() - started) / 10 * 1000

    reference = next((r["tps"] for r in rows if r["system"] == "transformers fp32"), None)
    header = (
        f"{'system':<28}{'tok/s':>9}{'tok/s+LoRA':>12}{'LoRA cost':>11}"
        f"{'x fp32':>8}{'x fp32+LoRA':>13}{'ppl':>9}"
    )
    print(header)
    for row in rows:
        row["lora_overhead"] = row["tps"] / row["tps_lora"] - 1
        ratio = f"{row['tps'] / reference:>8.2f}" if reference else f"{'-':>8}"
        ratio_lora = f"{row['tps_lora'] / reference:>13.2f}" if reference else f"{'-':>13}"
        print(
            f"{row['system']:<28}{row['tps']:>9.0f}{row['tps_lora']:>12.0f}"
            f"{row['lora_overhead']:>10.1%} {ratio}{ratio_lora}{row['ppl']:>9.2f}"
        )
    print(f"log-softmax readout of one window ({WINDOW // 2} rows x 49152): {readout_ms:.1f} ms")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rows": rows, "readout_ms": readout_ms, "tokens": len(tokens), "threads": threads},
                indent=2,
            )
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
