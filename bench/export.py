"""Export benchmark: how much of an adapter's change a merged GGUF keeps at each type, and what
merging buys in generation speed.

An adapter trained as a device's round 0 trains (`edgefed train --epochs 2` on --docs BBC
business articles, every other default; or --run, a finished run folder), then exported by
`edgefed export` as a merged GGUF at each --types type and as the base + adapter pair, and the
bare base requantized to each type (`edgefed quant requantize`). Each is scored by llama.cpp on
held-out articles of the same topic (the next --eval-docs after the training ones), every file
as it is (no runtime copy). What a merged file keeps of the adapter is its gain over the bare
base at the same type (re-rounding a Q4_1 base to another grid moves the base by itself),
as a share of the pair's gain over the Q4_1 base. Generation: --gen-tokens greedy
tokens after a short prompt, tokens/s of the base + adapter (the pair), of each merged file and
of the bare base, measured side by side in one process. Usage:

    python bench/export.py [--run RUN] [--docs 12] [--types f32,q8_0,q6_k,q4_k_m,q4_1]
                           [--json F]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgefed.demo_text import bbc_folder
from edgefed.quant.gguf_file import embedded_base_path
from edgefed.runtime import LlamaRuntime
from edgefed.runtime.generate import Sampling

PROMPT = "Shares in the company rose sharply on Monday after"


def edgefed(*args: object) -> str:
    done = subprocess.run([sys.executable, "-m", "edgefed", *map(str, args)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"edgefed {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a finished `edgefed train` run folder")
    parser.add_argument("--docs", type=int, default=12, help="training articles")
    parser.add_argument("--eval-docs", type=int, default=12, help="held-out articles scored")
    parser.add_argument("--types", default="f32,q8_0,q6_k,q4_k_m,q4_1")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    articles = sorted((bbc_folder() / "business").glob("*.txt"))
    work = Path(tempfile.mkdtemp(prefix="edgefed-export-bench-"))
    try:
        run = args.run
        if run is None:
            data = work / "data"
            data.mkdir()
            for article in articles[: args.docs]:
                shutil.copy(article, data)
            run = work / "run"
            print(f"training on {args.docs} articles ...", file=sys.stderr, flush=True)
            edgefed("train", "--data", data, "--out", run, "--epochs", 2)
        held_out = "\n\n".join(
            a.read_text(encoding="utf-8") for a in articles[args.docs : args.docs + args.eval_docs]
        )
        base = embedded_base_path()
        files: dict[str, tuple[Path, Path]] = {}
        for quant_type in args.types.split(","):
            merged, bare_at = work / f"merged.{quant_type}.gguf", work / f"base.{quant_type}.gguf"
            print(f"exporting merged {quant_type} ...", file=sys.stderr, flush=True)
            edgefed("export", "--adapter", run, "-o", merged, "--type", quant_type)
            edgefed("quant", "requantize", base, "-o", bare_at, "--type", quant_type)
            files[quant_type] = (merged, bare_at)
        pair = work / "pair"
        edgefed("export", "--adapter", run, "--format", "lora", "-o", pair)

        rows = []
        greedy = Sampling(max_tokens=args.gen_tokens, temperature=0)
        with LlamaRuntime(pair / "base.gguf", threads=args.threads) as runtime:
            adapter = runtime.load_adapter(pair / "adapter.gguf")
            bare = runtime.perplexity(held_out).perplexity
            adapted = runtime.perplexity(held_out, adapter).perplexity
            runtime.generate(PROMPT, None, greedy)  # warm-up
            speeds = {
                "base": runtime.generate(PROMPT, None, greedy).tokens_per_second,
                "pair": runtime.generate(PROMPT, adapter, greedy).tokens_per_second,
            }
        size = (pair / "base.gguf").stat().st_size + (pair / "adapter.gguf").stat().st_size
        rows.append({"model": "base alone", "perplexity": bare, "kept": 0.0,
                     "mib": (pair / "base.gguf").stat().st_size / 2**20,
                     "gen_tok_s": speeds["base"]})  # fmt: skip
        rows.append({"model": "lora pair (base + adapter)", "perplexity": adapted, "kept": 1.0,
                     "mib": size / 2**20, "gen_tok_s": speeds["pair"]})  # fmt: skip
        for quant_type, (path, bare_at) in files.items():
            with LlamaRuntime(bare_at, threads=args.threads) as runtime:
                bare_ppl = runtime.perplexity(held_out).perplexity
            with LlamaRuntime(path, threads=args.threads) as runtime:
                ppl = runtime.perplexity(held_out).perplexity
                runtime.generate(PROMPT, None, greedy)
                speed = runtime.generate(PROMPT, None, greedy).tokens_per_second
            kept = (bare_ppl - ppl) / (bare - adapted)
            rows.append({"model": f"merged {quant_type}", "perplexity": ppl, "kept": kept,
                         "bare_at_type": bare_ppl, "mib": path.stat().st_size / 2**20,
                         "gen_tok_s": speed})  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"held-out text: {args.eval_docs} BBC business articles; base {base.name}")
    print(f"{'model':30} {'MiB':>8} {'perplexity':>11} {'base at type':>13} {'kept':>7} "
          f"{'gen tok/s':>10} {'x pair':>7}")  # fmt: skip
    for row in rows:
        at_type = f"{row['bare_at_type']:13.4f}" if "bare_at_type" in row else " " * 13
        print(f"{row['model']:30} {row['mib']:8.1f} {row['perplexity']:11.4f} {at_type} "
              f"{row['kept']:7.1%} {row['gen_tok_s']:10.1f} "
              f"{row['gen_tok_s'] / speeds['pair']:7.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "base": str(base)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
