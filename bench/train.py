"""Training benchmark: the NF4 (QLoRA) training copy against the fp32 copy, on the embedded base.

Each configuration trains the same adapter (same data, init seed, data order and steps) in its
own `edgefed train` process, so peak RSS is per configuration, and all run back to back in one
invocation, so the ratios are comparable on a noisy shared machine:

- nf4:        the default, 4-bit NF4 linear layers (QLoRA)
- nf4+gc:     the same with gradient checkpointing
- fp32:       the exact dequantized GGUF weights in float32

Reported: training tokens/s, peak RSS, and the trust-validation perplexity of the base and of
the trained adapter, both measured by llama.cpp on the Q8_0 runtime copy of the base: the
adapter is used on the GGUF base, so that is the number that says how well it transfers.
Usage:

    python bench/train.py [--topic business] [--steps 20] [--configs nf4,nf4+gc,fp32] [--json F]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from edgefed.demo_text import BBC_TOPICS, bbc_folder

CONFIGS = {
    "nf4": ["--precision", "nf4"],
    "nf4+gc": ["--precision", "nf4", "--gradient-checkpointing"],
    "fp32": ["--precision", "fp32"],
}


def run(config: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        "-m",
        "edgefed",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        str(args.steps),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--eval-tokens",
        str(args.eval_tokens),
        "--json",
        *CONFIGS[config],
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{config} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topic", default="business", choices=BBC_TOPICS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    data = bbc_folder() / args.topic
    rows = {}
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-train-") as scratch:
        for config in args.configs.split(","):
            print(f"training {config} ...", file=sys.stderr, flush=True)
            metrics = run(config, data, Path(scratch) / config, args)
            rows[config] = {
                "tokens_per_second": metrics["train_tokens_per_second"],
                "peak_rss_mib": metrics["peak_rss_bytes"] / 2**20,
                "val_base": metrics["val"]["base_perplexity"],
                "val_adapter": metrics["val"]["perplexity"],
                "final_loss": metrics["loss_curve"][-1][1],
                "train_seconds": metrics["train_seconds"],
            }
    reference = rows[next(iter(rows))]
    print(
        f"\n{args.steps} steps of {args.batch_size}x{args.seq_len} tokens on BBC {args.topic}; "
        f"trust-val perplexity by llama.cpp (Q8_0 base), {args.eval_tokens} tokens\n"
    )
    header = f"{'config':<8} {'tok/s':>7} {'x':>5} {'peak RSS MiB':>13} {'x':>5} "
    print(header + f"{'val ppl base':>13} {'val ppl adapter':>16} {'change':>8}")
    for name, row in rows.items():
        change = row["val_adapter"] / row["val_base"] - 1
        print(
            f"{name:<8} {row['tokens_per_second']:>7.0f} "
            f"{row['tokens_per_second'] / reference['tokens_per_second']:>5.2f} "
            f"{row['peak_rss_mib']:>13.0f} {row['peak_rss_mib'] / reference['peak_rss_mib']:>5.2f} "
            f"{row['val_base']:>13.3f} {row['val_adapter']:>16.3f} {change:>+8.1%}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
