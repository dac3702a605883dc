"""Training benchmark: the three training copies side by side, on the embedded base and on a
Q4_K_M requantization of it.

- gguf:   the file's own quantized blocks, dequantized on the fly (the default)
- nf4:    QLoRA's 4-bit NF4 layers (bitsandbytes)
- fp32:   the exact dequantized GGUF weights in float32, the reference
- +gc:    any of them with gradient checkpointing (e.g. --configs gguf+gc)
- +bf16:  any of them with bfloat16 matmuls under autocast (e.g. --configs gguf+bf16)

For each base, in this process: the copy's own perplexity against llama.cpp's on the same
file (demo text), the memory its frozen weights take, and the time to build it. Then each
configuration trains the same adapter (same data, init seed, data order and steps) in its own
`edgefed train` process, so peak RSS is per configuration; all run back to back in one
invocation, so the ratios are comparable on a noisy shared machine. The adapter's
trust-validation perplexity is llama.cpp's on the Q8_0 runtime copy of that base: the adapter
is used on the GGUF base, so that is the number that says how well it transfers.

Usage:

    python bench/train.py [--topic business] [--steps 30] [--configs gguf,nf4,fp32]
                          [--bases q4_1,q4_k_m] [--copies gguf,nf4,fp32] [--json F]

`--configs ""` measures the copies alone (a few minutes instead of half an hour).

What limits training speed, in this process, on the embedded base (about 4 minutes):

    python bench/train.py --shapes 2x128,4x256,8x128,1x512,2x512 [--shape-copies gguf,fp32]

times optimizer steps (LoRA on the frozen copy, the sliced loss; the median of 4 after one
warm-up step) per batch x sequence length and copy, and the fp32 copy again under bf16
autocast (`--bf16`: the CPU's AVX-512 BF16 matmuls), against the issue's reference of 162
tok/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgefed.demo_text import BBC_TOPICS, bbc_folder, demo_evaluation_text
from edgefed.quant.gguf_file import embedded_base_path

PRECISION_OF = {"gguf": "gguf", "nf4": "nf4", "fp32": "fp32"}


def train_command(config: str, base: Path, data: Path, out: Path, args) -> list[str]:
    precision, *extras = config.split("+")
    command = [
        sys.executable, "-m", "edgefed", "train", "--data", str(data), "--out", str(out),
        "--base", str(base), "--steps", str(args.steps), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--eval-tokens", str(args.eval_tokens),
        "--precision", PRECISION_OF[precision], "--json",
    ]  # fmt: skip
    flags = {"gc": "--gradient-checkpointing", "bf16": "--bf16"}
    command += [flags[extra] for extra in extras]
    if "gc" not in extras:  # checkpointing is edgefed's default; a plain config trains without
        command.append("--no-gradient-checkpointing")
    return command


def train(config: str, base: Path, data: Path, out: Path, args) -> dict:
    done = subprocess.run(
        train_command(config, base, data, out, args), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"{config} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def copy_figures(base: Path, precisions: list[str], tokens) -> dict:
    """Each copy's perplexity, frozen-weight memory and build time, in this process."""
    from edgefed.quant.training_copy import frozen_weight_bytes, load_training_copy
    from edgefed.train.perplexity import torch_perplexity

    figures = {}
    for precision in precisions:
        started = time.perf_counter()
        model = load_training_copy(base, precision)
        seconds = time.perf_counter() - started
        figures[precision] = {
            "perplexity": torch_perplexity(model, tokens, window=512).perplexity,
            "weight_bytes": frozen_weight_bytes(model),
            "load_seconds": seconds,
        }
        del model
    return figures


def build_peak(base: Path, precision: str, home: str) -> dict:
    """Peak RSS while building a copy, above the process's baseline once the base is described
    (the description parses the GGUF once; every command pays it before any copy is built)."""
    script = f"""
import json, time
import torch, transformers, gguf, numpy, bitsandbytes, peft
from edgefed.quant.gguf_file import read_base_info
from edgefed.quant.training_copy import load_training_copy
read_base_info({str(base)!r})
import gc; gc.collect()
baseline = int(open("/proc/self/statm").read().split()[1]) * 4096
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to now
started = time.perf_counter()
model = load_training_copy({str(base)!r}, {precision!r})
seconds = time.perf_counter() - started
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
            if line.startswith("VmHWM"))
print(json.dumps({{"extra": peak - baseline, "seconds": seconds}}))
"""
    env = os.environ | {"EDGEFED_HOME": home}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_peak(base: Path, precision: str, args, home: str) -> dict:
    """Peak RSS of one training step (4 x 256 tokens by default) above the copy's own memory:
    the activations, the loss and the transient weights. A whole run's peak RSS adds what
    glibc's allocator keeps from step to step, which varies by hundreds of MB between runs."""
    script = f"""
import json, torch
from edgefed.adapter import LoraSpec, attach_lora
from edgefed.quant.training_copy import load_training_copy
from edgefed.train.loss import causal_lm_loss
model = attach_lora(load_training_copy({str(base)!r}, {precision!r}), LoraSpec())
model.train()
ids = torch.randint(0, 49152, ({args.batch_size}, {args.seq_len}),
                    generator=torch.Generator().manual_seed(0))
baseline = int(open("/proc/self/statm").read().split()[1]) * 4096
open("/proc/self/clear_refs", "w").write("5")
causal_lm_loss(model, ids, None, ids).backward()
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
            if line.startswith("VmHWM"))
print(json.dumps({{"extra": peak - baseline}}))
"""
    env = os.environ | {"EDGEFED_HOME": home}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# the fp32 copy's training speed measured before the sliced loss (docs/measurements/training.md)
REFERENCE_TOKENS_PER_SECOND = 162


def shape_sweep(shapes: list[tuple[int, int]], precisions: list[str]) -> list[dict]:
    """Tokens/s of one optimizer step per (copy, autocast, batch, seq_len); see the docstring."""
    import torch

    from edgefed.adapter import LoraSpec, attach_lora
    from edgefed.quant.training_copy import build_training_model
    from edgefed.train.loss import causal_lm_loss

    rows = []
    runs = [(p, False) for p in precisions] + [("fp32", True)]
    for precision, bf16 in runs:
        model = attach_lora(build_training_model(None, precision), LoraSpec())
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        for batch, seq_len in shapes:
            ids = torch.randint(0, model.config.vocab_size, (batch, seq_len),
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
            seconds = []
            for _ in range(5):
                started = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = causal_lm_loss(model, ids, torch.ones_like(ids), ids)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                seconds.append(time.perf_counter() - started)
            median = sorted(seconds[1:])[len(seconds[1:]) // 2]
            row = {"copy": precision + ("+bf16" if bf16 else ""), "batch": batch,
                   "seq_len": seq_len, "tokens_per_second": batch * seq_len / median}  # fmt: skip
            print(f"{row['copy']:<10} {batch}x{seq_len:<5} {row['tokens_per_second']:>6.0f} tok/s "
                  f"{row['tokens_per_second'] / REFERENCE_TOKENS_PER_SECOND:>5.2f}x of "
                  f"{REFERENCE_TOKENS_PER_SECOND}", flush=True)  # fmt: skip
            rows.append(row)
        del model, optimizer
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topic", default="business", choices=BBC_TOPICS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--configs", default="gguf,nf4,fp32")
    parser.add_argument("--bases", default="q4_1,q4_k_m")
    parser.add_argument("--copies", default="gguf,nf4,fp32", help="copies to measure as such")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--shapes", help="only the step-speed sweep over BxL shapes")
    parser.add_argument("--shape-copies", default="gguf,fp32")
    args = parser.parse_args()

    if args.shapes:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
        rows = shape_sweep(shapes, args.shape_copies.split(","))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        return

    from edgefed.runtime import LlamaRuntime
    from edgefed.runtime.quantize import requantize

    data = bbc_folder() / args.topic
    configs = [c for c in args.configs.split(",") if c]
    precisions = [c for c in args.copies.split(",") if c]
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-train-") as scratch:
        bases = {"q4_1": embedded_base_path()}
        if "q4_k_m" in args.bases.split(","):
            print("requantizing the embedded base to q4_k_m ...", file=sys.stderr, flush=True)
            bases["q4_k_m"] = requantize(bases["q4_1"], Path(scratch) / "q4_k_m.gguf", "q4_k_m")
        bases = {k: v for k, v in bases.items() if k in args.bases.split(",")}
        for base_name, base in bases.items():
            with LlamaRuntime(base) as runtime:
                tokens = runtime.tokenize(demo_evaluation_text(docs_per_topic=1))[:1024]
                gguf_ppl = runtime.perplexity(tokens).perplexity
            print(f"[{base_name}] the copies against llama.cpp ...", file=sys.stderr, flush=True)
            copies = copy_figures(base, precisions, tokens)
            for precision in precisions:
                home = str(Path(scratch) / f"home-{base_name}-{precision}-peak")
                copies[precision]["build"] = build_peak(base, precision, home)
                copies[precision]["step"] = step_peak(base, precision, args, home)
            rows = {}
            for config in configs:
                print(f"[{base_name}] training {config} ...", file=sys.stderr, flush=True)
                metrics = train(config, base, data, Path(scratch) / f"{base_name}-{config}", args)
                rows[config] = {
                    "tokens_per_second": metrics["train_tokens_per_second"],
                    "peak_rss_mib": metrics["peak_rss_bytes"] / 2**20,
                    "val_base": metrics["val"]["base_perplexity"],
                    "val_adapter": metrics["val"]["perplexity"],
                    "final_loss": metrics["loss_curve"][-1][1],
                }
            results[base_name] = {
                "file_bytes": base.stat().st_size,
                "llama_cpp_perplexity": gguf_ppl,
                "copies": copies,
                "training": rows,
            }
            report(base_name, results[base_name], args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def report(base_name: str, result: dict, args) -> None:
    size = result["file_bytes"]
    print(
        f"\n{base_name} base ({size / 2**20:.0f} MiB file): llama.cpp perplexity "
        f"{result['llama_cpp_perplexity']:.3f} on 1,024 demo tokens"
    )
    print(
        f"{'copy':<6} {'ppl':>8} {'vs llama.cpp':>13} {'weights MiB':>12} {'x file':>7} "
        f"{'build peak MiB':>15} {'x file':>7} {'build s':>8} {'step peak MiB':>14}"
    )
    for name, copy in result["copies"].items():
        print(
            f"{name:<6} {copy['perplexity']:>8.3f} "
            f"{copy['perplexity'] / result['llama_cpp_perplexity'] - 1:>+13.2%} "
            f"{copy['weight_bytes'] / 2**20:>12.0f} {copy['weight_bytes'] / size:>7.2f} "
            f"{copy['build']['extra'] / 2**20:>15.0f} {copy['build']['extra'] / size:>7.2f} "
            f"{copy['build']['seconds']:>8.1f} {copy['step']['extra'] / 2**20:>14.0f}"
        )
    rows = result["training"]
    if not rows:
        return
    reference = rows.get("fp32") or next(iter(rows.values()))
    print(
        f"\n{args.steps} steps of {args.batch_size}x{args.seq_len} tokens on BBC {args.topic}; "
        f"trust-val perplexity by llama.cpp (Q8_0 copy of this base), {args.eval_tokens} tokens"
    )
    print(
        f"{'config':<8} {'tok/s':>7} {'x fp32':>7} {'peak RSS MiB':>13} {'x fp32':>7} "
        f"{'val ppl base':>13} {'val ppl adapter':>16} {'change':>8}"
    )
    for name, row in rows.items():
        change = row["val_adapter"] / row["val_base"] - 1
        print(
            f"{name:<8} {row['tokens_per_second']:>7.0f} "
            f"{row['tokens_per_second'] / reference['tokens_per_second']:>7.2f} "
            f"{row['peak_rss_mib']:>13.0f} "
            f"{row['peak_rss_mib'] / reference['peak_rss_mib']:>7.2f} "
            f"{row['val_base']:>13.3f} {row['val_adapter']:>16.3f} {change:>+8.1%}"
        )


if __name__ == "__main__":
    main()
