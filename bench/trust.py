"""Trust benchmark: the cost of one `perplexity` trust row as the number of peers grows.

For N = 2, 4, 8, 16 peers on the embedded base, in one run, three ways to score the same
trust-validation tokens with N + 1 adapters (rank-8 LoRA on all projections, random non-zero
factors: a trained adapter's cost, not its values):

- "edgefed": what a device does now: one runtime, the base loaded once, the adapters in the
  fast layout (rank padded to 16, float32) swapped in and out, windows shared over the
  runtime's default lanes (parallel contexts over one model);
- "1 lane": the same with one context on all threads;
- "1 lane, r8 f16": one context and the plain layout (rank 8, float16): what edgefed did before;
- "reload": a fresh runtime per adapter, as a tool that loads "model + adapter" per evaluation.

Usage:

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


def make_adapters(folder: Path, count: int, base: Path, **layout) -> list[Path]:
    spec = LoraSpec()
    shapes = lora_tensor_shapes(lora_module_shapes(read_base_info(base), spec), spec.rank)
    paths = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        tensors = {n: torch.randn(s, generator=generator) * 0.01 for n, s in shapes.items()}
        peft_dir = save_lora_tensors(tensors, spec, folder / f"a{index}")
        suffix = "-".join(str(v) for v in layout.values())
        paths.append(
            convert_lora_to_gguf(peft_dir, folder / f"a{index}{suffix}.gguf", base=base, **layout)
        )
    return paths


def trust_row_seconds(evaluated: Path, adapters: list[Path], tokens, lanes: int | None) -> float:
    started = time.perf_counter()
    with LlamaRuntime(evaluated, lanes=lanes) as runtime:
        loaded = {f"d{i}": runtime.load_adapter(p) for i, p in enumerate(adapters)}
        inputs = TrustInputs(
            own="d0",
            adapters={d: {} for d in loaded},
            runtime=runtime,
            runtime_adapters=loaded,
            val_tokens=tokens,
        )
        compute_trust("perplexity", inputs)
    return time.perf_counter() - started


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
        fast = make_adapters(Path(scratch), max(counts) + 1, base)
        plain = make_adapters(Path(scratch), max(counts) + 1, base, out_type="f16", rank_multiple=1)
        with LlamaRuntime(evaluated, lanes=1) as probe:
            tokens = probe.tokenize(demo_evaluation_text())[: args.tokens]
        for n in counts:
            print(f"{n} peers ...", file=sys.stderr, flush=True)
            edgefed = trust_row_seconds(evaluated, fast[: n + 1], tokens, None)
            one_lane = trust_row_seconds(evaluated, fast[: n + 1], tokens, 1)
            before = trust_row_seconds(evaluated, plain[: n + 1], tokens, 1)
            started = time.perf_counter()
            for path in plain[: n + 1]:
                with LlamaRuntime(evaluated, lanes=1) as runtime:
                    runtime.perplexity(tokens, runtime.load_adapter(path))
            reloaded = time.perf_counter() - started
            rows.append(
                {
                    "peers": n,
                    "edgefed_s": edgefed,
                    "one_lane_s": one_lane,
                    "before_s": before,
                    "reloaded_s": reloaded,
                }
            )

    with LlamaRuntime(evaluated) as runtime:
        lanes, threads = runtime.lanes, runtime.threads
    print(
        f"\none perplexity trust row on {len(tokens)} tokens, embedded base (Q8_0 runtime copy), "
        f"{threads} threads; edgefed: {lanes} lane(s)\n"
    )
    columns = (
        ("edgefed_s", "edgefed"),
        ("one_lane_s", "1 lane"),
        ("before_s", "1 lane r8 f16"),
        ("reloaded_s", "reload r8 f16"),
    )
    print(
        f"{'peers':>5}"
        + "".join(f"{label + ' s':>16}{'s/adapter':>10}" for _, label in columns)
        + f"{'before/edgefed':>16}"
    )
    for row in rows:
        per = row["peers"] + 1
        print(
            f"{row['peers']:>5}"
            + "".join(f"{row[key]:>16.2f}{row[key] / per:>10.3f}" for key, _ in columns)
            + f"{row['before_s'] / row['edgefed_s']:>15.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
