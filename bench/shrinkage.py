"""How much of a mix's gain is shrinkage? Each device's own adapter with its delta scaled down.

Averaging N adapters that each overfit their own few documents shrinks every device's own
delta to about 1/N of it (the others' deltas are nearly orthogonal to it), and shrinking an
overfitted delta alone can help as much as collaborating does. This bench tells the two apart
on a finished one-round `edgefed simulate` run with a `local` and a `fedavg` variant (a cell of
bench/quality.py): it scales each device's round-0 local adapter by s (ΔW = B·A → s·B·A, the
LoRA B factor times s), scores it on the device's test split with the same runtime and tokens
as the simulation's evaluation, and prints the mean over clients per seed next to FedAvg's mix
of the same seed, with the paired gain (mean and std over seeds).

    python bench/shrinkage.py bench/results/regime/code-prose/docs-10_epochs-3_rounds-1/run \\
        --scales 0.25,0.5,1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from quality import paired  # bench/quality.py: the one paired gain of both benches


def scaled_adapter(source: Path, scale: float, destination: Path, base: Path) -> Path:
    """The PEFT adapter in `source` with its B factors times `scale`, as a GGUF LoRA file."""
    from safetensors.torch import load_file, save_file

    from edgefed.quant.lora_gguf import convert_lora_to_gguf

    shutil.copytree(source, destination)
    weights = destination / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({n: t * scale if ".lora_B." in n else t for n, t in tensors.items()}, weights)
    return convert_lora_to_gguf(destination, destination.with_suffix(".gguf"), base=base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished one-round simulation's --out folder")
    parser.add_argument("--scales", default="0.25,0.5,1", help="factors of each local delta")
    args = parser.parse_args()

    from edgefed.device.split_text import device_split_tokens
    from edgefed.device.workspace import Workspace
    from edgefed.loaded_base import LoadedBase
    from edgefed.runtime.llama import ScoreJob
    from edgefed.train.split import TEST

    # bench/quality.py keeps a cell's results.json beside its run folder
    found = [
        f for f in (args.run / "results.json", args.run.parent / "results.json") if f.is_file()
    ]
    if not found:
        parser.error(f"no results.json in {args.run} or beside it: is the run finished?")
    results = json.loads(found[0].read_text())
    if not results.get("finished", True):
        parser.error(f'{found[0]} is a stopped simulation\'s ("finished": false): finish it')
    settings = results["settings"]
    if settings["rounds"] != 1 or not {"local", "fedavg"} <= set(results["runs"]):
        parser.error("give a one-round run with a local and a fedavg variant")
    if settings["seeds"] < 2:
        parser.error("give a run of 2 or more seeds: the gains are paired over seeds")
    scales = [float(s) for s in args.scales.split(",")]
    clients = [c["name"] for c in results["clients"]]
    means: dict[float, list[float]] = {s: [] for s in scales}
    fedavg: list[float] = []
    with tempfile.TemporaryDirectory() as scratch, LoadedBase(results_base(args.run)) as loaded:
        runtime = loaded.runtime
        for seed in range(settings["seeds"]):
            scored: dict[float, list[float]] = {s: [] for s in scales}
            for client in clients:
                folder = args.run / "federations" / "local" / f"seed-{seed}" / "devices" / client
                workspace = Workspace(folder)
                train = workspace.train_run(0)
                tokens = device_split_tokens(
                    workspace, train.root, runtime, TEST, settings["test_tokens"]
                )
                jobs = []
                for s in scales:
                    scratch_copy = Path(scratch) / f"{seed}-{client}-{s:g}"
                    adapter = scaled_adapter(train.adapter, s, scratch_copy, loaded.base_path)
                    jobs.append(ScoreJob(tokens, loaded.load_file(adapter), f"{s:g}"))
                for s, result in zip(scales, runtime.perplexities(jobs), strict=True):
                    scored[s].append(result.perplexity)
            devices = results["runs"]["fedavg"][str(seed)][-1]["devices"]
            fedavg.append(statistics.fmean(devices[c]["perplexity"]["aggregated"] for c in clients))
            for s in scales:
                means[s].append(statistics.fmean(scored[s]))
            shown = ", ".join(f"local x{s:g} {means[s][-1]:.3f}" for s in scales)
            print(f"seed {seed}: {shown}; fedavg {fedavg[-1]:.3f}", flush=True)

    print(f"\n{results['dataset']}, {settings['epochs']:g} epochs, {settings['seeds']} seeds")
    print("| model | test ppl (mean ± std) | vs FedAvg (mean ± std over seeds) |")
    print("| --- | --- | ---: |")
    print(f"| fedavg | {statistics.fmean(fedavg):.3f} ± {statistics.stdev(fedavg):.3f} | – |")
    for s in scales:
        gain, spread, _ = paired(means[s], fedavg)
        print(f"| local × {s:g} | {statistics.fmean(means[s]):.3f} ± "
              f"{statistics.stdev(means[s]):.3f} | {gain:+.2%} ± {spread:.2%} |")  # fmt: skip


def results_base(run: Path) -> Path:
    """The base every device of the run was joined with."""
    device = next((run / "federations" / "local" / "seed-0" / "devices").iterdir())
    return Path(json.loads((device / "device.json").read_text())["base"])


if __name__ == "__main__":
    main()
