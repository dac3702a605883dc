"""Temperature benchmark: which softmax scale over `perplexity` trust scores mixes best.

One device per BBC topic, each with a few of its topic's articles (scarce local data, as in the
paper's setting). Every device trains a local adapter from the federation's shared init, then
scores every device's adapter on its own trust-validation split (llama.cpp, one loaded base,
adapters swapped): P[i][j] = mean NLL of adapter j on device i's text. For each temperature T
device i mixes the adapters with softmax(−P[i] / T) (factor-wise merge) and the mix is scored on
device i's *test* split. Baselines from the same adapters: local (W = I), FedAvg (uniform), and
the paper's rule, softmax(−perplexity) on raw perplexities. Usage:

    python bench/temperature.py [--docs 100] [--steps 20] [--temperatures 0.01,...] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

from edgefed.adapter import LoraSpec, read_adapter_folder, save_lora_tensors
from edgefed.demo_text import BBC_TOPICS, bbc_topic
from edgefed.documents import read_documents
from edgefed.loaded_base import LoadedBase
from edgefed.quant.gguf_file import embedded_base_path
from edgefed.quant.lora_gguf import convert_lora_to_gguf
from edgefed.runtime import LlamaRuntime, runtime_copy
from edgefed.train.blocks import evaluation_stream, token_stream
from edgefed.train.loop import TrainConfig
from edgefed.train.run import train_adapter
from edgefed.train.run_folder import RunFolder
from edgefed.train.split import TEST, TRUST_VAL, SplitRule, split_documents
from edgefed.trust.merge import merge_factors
from edgefed.trust.normalize import trust_row


def device_data(folder: Path, topic: str, docs: int) -> Path:
    """The first `docs` articles of `topic` (by document id) as text files."""
    documents = sorted(bbc_topic(topic).documents, key=lambda d: d.id)[:docs]
    folder.mkdir(parents=True, exist_ok=True)
    for document in documents:
        (folder / f"{document.id[:16]}.txt").write_text(document.text, encoding="utf-8")
    return folder


def split_tokens(runtime, data: Path, rule: SplitRule, name: str, limit: int):
    split = split_documents(read_documents(data).documents, rule)
    stream = token_stream(split[name], lambda t: runtime.tokenize(t, add_bos=False), runtime.eos)
    return evaluation_stream(stream, runtime.bos, limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100, help="articles per device")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--tokens", type=int, default=4096, help="cap per split")
    parser.add_argument("--temperatures", default="0.003,0.01,0.03,0.1,0.3,1")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, help="keep the runs here and reuse finished ones")
    args = parser.parse_args()
    temperatures = [float(t) for t in args.temperatures.split(",")]
    rule = SplitRule(val_fraction=0.15, test_fraction=0.15)
    base = embedded_base_path()
    spec = LoraSpec()

    with tempfile.TemporaryDirectory(prefix="edgefed-bench-temperature-") as scratch:
        root = args.work or Path(scratch)
        adapters, data = {}, {}
        for topic in BBC_TOPICS:
            data[topic] = device_data(root / "data" / topic, topic, args.docs)
            run_dir = root / "runs" / topic
            if RunFolder(run_dir).is_finished():
                adapters[topic] = read_adapter_folder(run_dir)[1]
                continue
            print(f"training {topic} ...", file=sys.stderr, flush=True)
            with LoadedBase(base, precision=args.precision) as loaded:
                result = train_adapter(
                    data[topic],
                    run_dir,
                    loaded,
                    config=TrainConfig(
                        seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps
                    ),
                    lora=spec,
                    split_rule=rule,
                    eval_tokens=args.tokens,
                )
            adapters[topic] = read_adapter_folder(result.adapter_dir)[1]

        print("scoring and mixing ...", file=sys.stderr, flush=True)
        rules = {f"T={t:g}": ("nll", t) for t in temperatures} | {"paper": ("ppl", 1.0)}
        results: dict[str, list[float]] = {"base": [], "local": [], "fedavg": []} | {
            name: [] for name in rules
        }
        matrices: dict[str, list[list[float]]] = {name: [] for name in rules}
        with LlamaRuntime(runtime_copy(base)) as runtime:
            loaded = {
                t: runtime.load_adapter(
                    convert_lora_to_gguf(
                        root / "runs" / t / "adapter", root / f"{t}.gguf", base=base
                    )
                )
                for t in BBC_TOPICS
            }
            for i, topic in enumerate(BBC_TOPICS):
                val = split_tokens(runtime, data[topic], rule, TRUST_VAL, args.tokens)
                test = split_tokens(runtime, data[topic], rule, TEST, args.tokens)
                nll = [runtime.perplexity(val, loaded[t]).mean_nll for t in BBC_TOPICS]
                results["base"].append(runtime.perplexity(test).perplexity)
                results["local"].append(runtime.perplexity(test, loaded[topic]).perplexity)
                mixes = {"fedavg": [1 / len(BBC_TOPICS)] * len(BBC_TOPICS)}
                for name, (scale, t) in rules.items():
                    scores = [-(math.exp(v) if scale == "ppl" else v) for v in nll]
                    mixes[name] = trust_row(scores, i, temperature=t)
                    matrices[name].append([round(w, 4) for w in mixes[name]])
                for index, (name, weights) in enumerate(mixes.items()):
                    mixed = merge_factors([adapters[t] for t in BBC_TOPICS], weights).tensors
                    folder = save_lora_tensors(mixed, spec, root / "mix" / topic / str(index))
                    gguf = convert_lora_to_gguf(
                        folder, root / "mix" / topic / f"{index}.gguf", base=base
                    )
                    score = runtime.perplexity(test, runtime.load_adapter(gguf)).perplexity
                    results[name].append(score)
                print(f"  {topic} done", file=sys.stderr, flush=True)

    local = results["local"]
    summary = {
        name: {
            "mean_test_perplexity": statistics.fmean(values),
            "per_device": [round(v, 3) for v in values],
            "beats_local": sum(v < loc for v, loc in zip(values, local, strict=True)),
        }
        for name, values in results.items()
    }
    print(f"{'rule':>10} {'mean test ppl':>14} {'beats local':>12}  per device ({BBC_TOPICS})")
    for name, row in summary.items():
        print(
            f"{name:>10} {row['mean_test_perplexity']:>14.3f} "
            f"{row['beats_local']:>8}/{len(local)}   {row['per_device']}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "summary": summary,
                    "trust_matrices": matrices,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
