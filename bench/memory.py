"""Memory benchmark: the peak resident memory of a whole `edgefed round`, and what each measure
against it costs in training speed.

A federation of two devices on a shared folder, each with --docs BBC articles (ann: business,
ben: sports), every default but the measure under test. ben runs its round 0 once (the same
for every configuration), so ann's round 0 trains, publishes, finds ben's adapter, scores it
and its own on its trust-validation text, mixes and evaluates: every phase a device runs.
Then ann's round 0 runs once per configuration from the same starting state, each in its own
process (peak RSS is the process's, from wait4), back to back so the ratios compare on a
noisy machine:

- plain:       no gradient checkpointing, no huge pages (edgefed before this benchmark)
- checkpoint:  gradient checkpointing only
- huge-pages:  PyTorch's THP_MEM_ALLOC_ENABLE only
- default:     both (edgefed's defaults)
- mmap:        both, and glibc's MALLOC_MMAP_THRESHOLD_=1048576 (no heap retention at all)

Training tokens/s is the round's own figure (optimizer steps only). Usage:

    python bench/memory.py [--docs 12] [--configs plain,checkpoint,huge-pages,default,mmap]
                           [--base PATH] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from edgefed.demo_text import bbc_folder

CONFIGS = {
    "plain": (["--no-gradient-checkpointing"], {"THP_MEM_ALLOC_ENABLE": "0"}),
    "checkpoint": (["--gradient-checkpointing"], {"THP_MEM_ALLOC_ENABLE": "0"}),
    "huge-pages": (["--no-gradient-checkpointing"], {"THP_MEM_ALLOC_ENABLE": "1"}),
    "default": ([], {}),
    "mmap": ([], {"MALLOC_MMAP_THRESHOLD_": "1048576"}),
}


def edgefed(args: list[str], home: Path, env: dict | None = None) -> tuple[float, int, str]:
    """Run one command; its wall seconds, its peak RSS in bytes (wait4), and its stdout."""
    environment = os.environ | {"HOME": str(home)} | (env or {})
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "edgefed", *args], env=environment, stdout=out, stderr=err
        )
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"edgefed {' '.join(args)} failed:\n{err.read()[-3000:]}")
        return seconds, usage.ru_maxrss * 1024, out.read()


def prepare(start: Path, docs: int, base: str | None, peer_args: Sequence[str] = ()) -> None:
    """Two devices joined, ben's round 0 published: the state every configuration starts at.
    `peer_args`: options of ben's round (bench/models.py trains it one step on large bases,
    only so that there is an adapter to score)."""
    home = start / "home"
    for device, topic in (("ann", "business"), ("ben", "sports")):
        folder = start / "data" / device
        folder.mkdir(parents=True)
        for article in sorted((bbc_folder() / topic).glob("*.txt"))[:docs]:
            shutil.copy(article, folder)
    edgefed(["init", str(start / "fed"), *(["--base", base] if base else [])], home)
    for device in ("ann", "ben"):
        edgefed(
            ["join", str(start / "fed"), "--device", device, "--data",
             str(start / "data" / device), "--workspace", str(start / device),
             *(["--base", base] if base else [])],
            home,
        )  # fmt: skip
    edgefed(["round", "--workspace", str(start / "ben"), "--wait", "0", *peer_args], home)


def measure(start: Path, config: str) -> dict:
    """ann's round 0 under one configuration, from the prepared state."""
    flags, env = CONFIGS[config]
    seconds, peak, out = edgefed(
        ["round", "--workspace", str(start / "ann"), "--wait", "0", "--json", *flags],
        start / "home",
        env,
    )
    evaluation = json.loads(out)["evaluation"]["models"]
    metrics = json.loads((start / "ann" / "rounds" / "0" / "train" / "metrics.json").read_text())
    return {
        "config": config,
        "peak_rss_mib": peak >> 20,
        "train_peak_rss_mib": metrics["peak_rss_bytes"] >> 20,
        "train_tokens_per_second": metrics["train_tokens_per_second"],
        "steps": metrics["steps"],
        "round_seconds": round(seconds, 1),
        "test_perplexity": {name: round(m["perplexity"], 3) for name, m in evaluation.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=12, help="articles per device")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--base", help="GGUF base (default: the embedded one)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    configs = [c for c in args.configs.split(",") if c]

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-memory-") as scratch:
        start, snapshot = Path(scratch) / "state", Path(scratch) / "snapshot"
        prepare(start, args.docs, args.base)
        shutil.copytree(start, snapshot, symlinks=True)
        print(f"ben's round 0 is published; ann's round 0 per configuration ({args.docs} docs)")
        for config in configs:
            # the workspaces record absolute paths: every run starts from the same place
            shutil.rmtree(start)
            shutil.copytree(snapshot, start, symlinks=True)
            rows.append(measure(start, config))
            print(json.dumps(rows[-1]), flush=True)

    reference = next((r for r in rows if r["config"] == "plain"), rows[0])
    print(f"\n| configuration | round peak RSS | × {reference['config']} | training tok/s | × |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['config']} | {row['peak_rss_mib']:,} MiB | "
            f"{row['peak_rss_mib'] / reference['peak_rss_mib']:.2f} | "
            f"{row['train_tokens_per_second']:.0f} | "
            f"{row['train_tokens_per_second'] / reference['train_tokens_per_second']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
