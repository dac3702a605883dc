"""How long a device should train, and what stopping at the best buys: one device alone.

For each topic, document count and training length (epochs of the device's own train split),
one `train_adapter` run over the shared base, as a round trains (the default TrainConfig:
4 x 256 tokens, lr 1e-3, the gguf copy). The stopper is the library's, extended here to also
score the device's test split at every point it scores, so one run gives the test perplexity of
the adapter it keeps, of its last step and of every point in between. Printed side by side:
steps, the point kept, test perplexity of base / kept / last step (PyTorch on the training
copy), the kept adapter's test perplexity in llama.cpp (what a user's round reports), and what
the scoring cost against the training time.

    python bench/epochs.py [--topics business,tech] [--docs 10,60] [--epochs 0.5,1,2,4]
                           [--json bench/results/epochs.json]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import edgefed.train.run as train_run
from edgefed.demo_text import bbc_folder
from edgefed.documents import read_documents
from edgefed.loaded_base import LoadedBase
from edgefed.train.blocks import evaluation_stream, token_stream
from edgefed.train.loop import TrainConfig
from edgefed.train.split import TEST, SplitRule, split_documents
from edgefed.train.stopping import Stopper


def watching_stopper(test_tokens: np.ndarray, log: list):
    """The library's Stopper, also scoring `test_tokens` at each point into `log`."""

    class Watching(Stopper):
        def _test(self, model, step: int) -> None:
            from edgefed.train.perplexity import torch_token_logprobs

            nll = -torch_token_logprobs(model, test_tokens, window=self.window,
                                        stride=self.window // 2).mean()  # fmt: skip
            log.append((step, float(nll)))

        def start(self, model, base_state) -> None:
            super().start(model, base_state)
            self._test(model, 0)

        def observe(self, model, step: int) -> None:
            super().observe(model, step)
            self._test(model, step)

    return Watching


def device_folder(topic: str, docs: int, root: Path) -> Path:
    folder = root / f"{topic}-{docs}"
    folder.mkdir(parents=True)
    for path in sorted((bbc_folder() / topic).glob("*.txt"))[:docs]:
        shutil.copy(path, folder / path.name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topics", default="business,tech")
    parser.add_argument("--docs", default="10,60")
    parser.add_argument("--epochs", default="0.5,1,2,4")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LoadedBase(None) as loaded:
        runtime = loaded.runtime
        for topic in args.topics.split(","):
            for docs in (int(d) for d in args.docs.split(",")):
                data = device_folder(topic, docs, Path(tmp) / "data")
                documents = read_documents(data).documents
                test = split_documents(documents, SplitRule())[TEST]
                stream = token_stream(test, lambda t: runtime.tokenize(t, add_bos=False),
                                      runtime.eos)  # fmt: skip
                test_tokens = evaluation_stream(stream, runtime.bos, None)
                base_test = runtime.perplexity(test_tokens).perplexity
                for epochs in (float(e) for e in args.epochs.split(",")):
                    log: list = []
                    train_run.Stopper = watching_stopper(test_tokens, log)
                    out = Path(tmp) / f"run-{topic}-{docs}-{epochs:g}"
                    started = time.perf_counter()
                    result = train_run.train_adapter(
                        data, out, loaded, config=TrainConfig(epochs=epochs)
                    )
                    wall = time.perf_counter() - started
                    metrics, stopping = result.metrics, result.metrics.stopping
                    test_at = dict(log)
                    kept_test = runtime.perplexity(
                        test_tokens, loaded.load_file(result.gguf_adapter)
                    ).perplexity
                    row = {
                        "topic": topic, "docs": docs, "epochs": epochs,
                        "train_tokens": metrics.data["tokens"]["train"],
                        "steps": metrics.steps, "kept": stopping["kept"],
                        "kept_step": stopping["kept_step"],
                        "test_base_torch": math.exp(test_at[0]),
                        "test_kept_torch": math.exp(test_at[stopping["kept_step"]]),
                        "test_last_torch": math.exp(test_at[metrics.steps]),
                        "test_best_torch": math.exp(min(test_at.values())),
                        "test_base_llama": base_test, "test_kept_llama": kept_test,
                        "stop_tokens": stopping["tokens"],
                        "stop_seconds": stopping["seconds"],
                        "train_seconds": metrics.train_seconds, "wall_seconds": wall,
                        "curve": stopping["curve"], "test_curve": log,
                    }  # fmt: skip
                    rows.append(row)
                    print(
                        f"{topic:9} {docs:3} docs {epochs:4g} ep: {metrics.steps:3} steps, kept "
                        f"{stopping['kept']} @ {stopping['kept_step']:3}; test ppl base "
                        f"{row['test_base_torch']:.2f} kept {row['test_kept_torch']:.2f} last "
                        f"{row['test_last_torch']:.2f} best {row['test_best_torch']:.2f} | "
                        f"llama.cpp base {base_test:.2f} kept {kept_test:.2f} | scoring "
                        f"{stopping['seconds']:.1f} s of {metrics.train_seconds:.1f} s training",
                        flush=True,
                    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
