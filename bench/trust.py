"""Trust benchmark: the cost of one `perplexity` trust row as the number of peers grows.

For N = 2, 4, 8, 16 peers on the embedded base, in one run: (a) one runtime, the base loaded
once, N + 1 adapters loaded once and swapped in and out (what edgefed does), against (b) a
fresh runtime per adapter, as a tool that loads "model + adapter" per evaluation would. Both
score the same trust-validation tokens; the adapters are rank-8 LoRA on all projections with
random non-zero factors (a trained adapter's cost, not its values). Usage:

    python bench/trust.py [--peers 2,4,8,16] [--tokens 1024] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgefed.adapter import LoraSpec, lora_module_shapes, lora_tensor_shapes, save_lora_tensors
from edgefed.demo_text import demo_evaluation_text
from edgefed.quant.gguf_file import embedded_base_path, read_base_info
from edgefed.quant.lora_gguf import convert_lora_to_gguf
from edgefed.runtime import LlamaRuntime, runtime_copy
from edgefed.trust.schemes import TrustInputs, compute_trust


def make_adapters(folder: Path, count: int, base: Path) -> list[Path]:
    spec = LoraSpec()
    shapes = lora_tensor_shapes(lora_module_shapes(read_base_info(base), spec), spec.rank)
    paths = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        tensors = {n: torch.randn(s, generator=generator) * 0.01 for n, s in shapes.items()}
        peft_dir = save_lora_tensors(tensors, spec, folder / f"a{index}")
        paths.append(convert_lora_to_gguf(peft_dir, folder / f"a{index}.gguf", base=base))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="2,4,8,16")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    counts = [int(n) for n in args.peers.split(",")]

    base = embedded_base_path()
    evaluated = runtime_copy(base)  # the Q8_0 copy the runtime uses by default
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-trust-") as scratch:
        print("making adapters ...", file=sys.stderr, flush=True)
        gguf_adapters = make_adapters(Path(scratch), max(counts) + 1, base)
        with LlamaRuntime(evaluated) as probe:
            tokens = probe.tokenize(demo_evaluation_text())[: args.tokens]
        for n in counts:
            print(f"{n} peers ...", file=sys.stderr, flush=True)
            chosen = gguf_adapters[: n + 1]
            started = time.perf_counter()
            with LlamaRuntime(evaluated) as runtime:
                loaded = {f"d{i}": runtime.load_adapter(p) for i, p in enumerate(chosen)}
                inputs = TrustInputs(
                    own="d0",
                    adapters={d: {} for d in loaded},
                    runtime=runtime,
                    runtime_adapters=loaded,
                    val_tokens=tokens,
                )
                compute_trust("perplexity", inputs)
            swapped = time.perf_counter() - started

            started = time.perf_counter()
            for path in chosen:
                with LlamaRuntime(evaluated) as runtime:
                    runtime.perplexity(tokens, runtime.load_adapter(path))
            reloaded = time.perf_counter() - started
            rows.append({"peers": n, "swapped_s": swapped, "reloaded_s": reloaded})

    print(
        f"\none perplexity trust row on {len(tokens)} tokens, embedded base (Q8_0 runtime copy)\n"
    )
    print(
        f"{'peers':>5} {'swap s':>8} {'s/adapter':>10} {'reload s':>9} {'s/adapter':>10} {'x':>6}"
    )
    for row in rows:
        per = row["peers"] + 1
        print(
            f"{row['peers']:>5} {row['swapped_s']:>8.2f} {row['swapped_s'] / per:>10.3f} "
            f"{row['reloaded_s']:>9.2f} {row['reloaded_s'] / per:>10.3f} "
            f"{row['reloaded_s'] / row['swapped_s']:>6.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
