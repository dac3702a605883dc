"""Quality benchmark, the regime map: where collaboration pays and where trust beats FedAvg.

A device gains from its peers only when its own data is scarce for the training it gets. So
the map runs `edgefed simulate` over a grid of data per device (--docs, documents per client)
and training per device (--epochs, passes over its train split in total over the rounds, shared
equally by them) for each federation (--datasets), every trust variant (--trust: local, FedAvg,
the oracle that knows the clients' mixtures, the trust schemes at their temperatures) and
--seeds seeds (shared init and data order; the same for every variant). For each cell it
prints the mean over clients of the test perplexity of each device's mix after the last round
(mean ± std over seeds), the gain over local and FedAvg with its paired σ (mean over the std of
the per-seed differences: every variant runs the same seeds), the clients that beat local and
the gap to the oracle; and whether the issue's target is met for the trust schemes (both
baselines beaten by more than 2 paired σ, at least 90% of clients beating local). A cell of
several rounds also gets each variant's perplexity and gain over FedAvg after every round. The
plot: a row per federation, the gain over local and over FedAvg (mean ± std of the per-seed
gains) against documents per client at a fixed training, and against epochs at a fixed size.

    python bench/quality.py --work bench/results/regime --datasets code-prose-mixed \\
        --docs 10,20 --epochs 1,3,10 --seeds 3 --plot docs/regime.png

A finished cell in --work is reused and the report covers every finished cell there, so the
map can be filled in over several runs; --report-only runs nothing. A cell runs a seed at a
time, and keeps each of its variants' results as it ends (seeds/<seed>.json), so a cell cut
short goes on with the variants its seed still lacks. In bench/results/regime, each cell's
results.json and cell.json (and an unfinished cell's seeds/) are kept in the repository (its
run folder, the adapters, is ignored), so the map outlives the machine that measured it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_VARIANTS = (
    "local,fedavg,oracle,perplexity:t=0.01,perplexity:se=3,perplexity:se=10,prediction:t=0.1"
)
TARGET_SCHEMES = ("perplexity", "prediction")
BASELINES = {"local", "fedavg"}  # every gain in the map is measured against them
CELL_FILE = "cell.json"


def cell_dir(work: Path, dataset: str, docs: int, epochs: float | None, rounds: int) -> Path:
    training = "default" if epochs is None else f"{epochs:g}"
    return work / dataset / f"docs-{docs}_epochs-{training}_rounds-{rounds}"


def schedule_epochs(schedule: dict, rounds: int) -> float:
    """Epochs per device over all rounds of a schedule in epochs (its step cap aside)."""
    return schedule["warmup_epochs"] + (rounds - 1) * schedule["round_epochs"]


def run_cell(folder: Path, dataset: str, docs: int, epochs: float | None, args) -> None:
    """`edgefed simulate` for one cell, a seed at a time, unless its results are there; records
    its minutes. A seed's variants are kept (seeds/<seed>.json, in the repository) as each
    ends, so a cell longer than a session goes on with what it lacks, on this machine or
    another; the last seed merges them into results.json. Epochs None: the federation's
    default schedule (more epochs in round 0 than later)."""
    if (folder / "results.json").is_file():
        return
    parts = [run_seed(folder, dataset, docs, epochs, seed, args) for seed in range(args.seeds)]
    results = merge_seeds(parts)
    schedule = results["settings"]["schedule"]
    minutes = sum(part["minutes"] for part in parts)
    cell = {"dataset": dataset, "docs": docs, "rounds": args.rounds, "minutes": minutes,
            "epochs": epochs or schedule_epochs(schedule, args.rounds),
            "schedule": "default" if epochs is None else "even"}  # fmt: skip
    (folder / CELL_FILE).write_text(json.dumps(cell) + "\n")  # before results.json marks it done
    tmp = folder / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, folder / "results.json")
    shutil.rmtree(folder / "seeds")
    shutil.rmtree(folder / "run", ignore_errors=True)
    print(f"{folder.name}: {minutes:.1f} min", file=sys.stderr, flush=True)


def run_seed(folder: Path, dataset: str, docs: int, epochs: float | None, seed: int, args) -> dict:
    """One seed of a cell: its kept results, or `edgefed simulate --first-seed seed --seeds 1
    --resume` for the variants it still lacks. The simulation rewrites its results.json as each
    variant's federation ends, and that is copied into seeds/<seed>.json (in the repository) as
    it appears; the run folder (ignored, on this machine) keeps every finished step, so a seed
    stopped with the session goes on in the next from the step it was in."""
    from edgefed.trust.settings import parse_variants

    part = folder / "seeds" / f"{seed}.json"
    kept = json.loads(part.read_text()) if part.is_file() else None
    wanted = [variant.label for variant in parse_variants(args.trust)]  # as results name them
    missing = [v for v in wanted if kept is None or v not in kept["runs"]]
    if not missing:
        return with_kept(kept, None, wanted)
    run = folder / "run" / f"seed-{seed}"
    command = [
        sys.executable, "-m", "edgefed", "simulate", "--dataset", dataset,
        "--docs-per-client", str(docs), "--rounds", str(args.rounds),
        "--trust", ",".join(missing), "--seeds", "1", "--first-seed", str(seed),
        "--val-tokens", str(args.val_tokens), "--test-tokens", str(args.test_tokens),
        "--out", str(run), "--resume",
    ]  # fmt: skip
    if epochs is not None:
        command += ["--epochs", f"{epochs:g}"]
    print("$ edgefed " + " ".join(command[3:]), file=sys.stderr, flush=True)
    # the seed's minutes over every session that ran it, finished variants or not
    spent = run.with_name(f"seed-{seed}.minutes")
    try:
        before = float(spent.read_text())
    except (OSError, ValueError):  # none yet (or an older run's): count from the kept part
        before = (kept or {}).get("minutes", 0.0)
    started = time.perf_counter()
    simulation = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    seen = None
    while True:
        try:  # before the read: the last results are written by the time it has exited
            code = simulation.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        minutes = before + (time.perf_counter() - started) / 60
        spent.parent.mkdir(parents=True, exist_ok=True)
        spent.with_suffix(".tmp").write_text(f"{minutes:.2f}\n")
        os.replace(spent.with_suffix(".tmp"), spent)
        current = run / "results.json"
        if current.is_file() and current.stat().st_mtime_ns != seen:
            seen = current.stat().st_mtime_ns
            results = with_kept(json.loads(current.read_text()), kept, wanted)
            results["minutes"] = minutes
            part.parent.mkdir(exist_ok=True)
            tmp = part.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1) + "\n")
            os.replace(tmp, part)
            done = [v for v in wanted if v in results["runs"]]
            print(f"{folder.name} seed {seed}: {', '.join(done)} kept, "
                  f"{results['minutes']:.1f} min", file=sys.stderr, flush=True)  # fmt: skip
        if code is not None:
            break
    if code != 0:
        raise subprocess.CalledProcessError(code, command)
    return json.loads(part.read_text())


def with_kept(results: dict, kept: dict | None, wanted: list[str]) -> dict:
    """A simulation's results with the variants an earlier, stopped run of the same seed kept,
    in the order asked for; only those asked for. Refuses kept results of other settings."""
    from edgefed.simulation.run import summarize

    if kept is not None:
        same = ("rounds", "schedule", "epochs", "lora", "train", "precision", "test_tokens",
                "val_tokens", "max_tokens", "first_seed")  # fmt: skip
        differ = [k for k in same if kept["settings"].get(k) != results["settings"].get(k)]
        differ += [k for k in ("dataset", "base") if kept.get(k) != results.get(k)]
        # a client's "epochs" is what it trained in the first variant a run made (stopping
        # makes later rounds differ by variant): the kept part's stays, the rest must agree
        if [_without_epochs(c) for c in kept["clients"]] != [
            _without_epochs(c) for c in results["clients"]
        ]:
            differ.append("clients")
        if differ:
            sys.exit(f"the kept seed results differ in {', '.join(differ)}: remove the seed's "
                     "file to run it again")  # fmt: skip
    if kept is not None:
        results = results | {"clients": kept["clients"]}
    runs = (kept or {}).get("runs", {}) | results["runs"]
    results = results | {"runs": {v: runs[v] for v in wanted if v in runs}}
    results["settings"] = results["settings"] | {"variants": wanted}
    results["finished"] = all(v in runs for v in wanted)
    results["summary"] = summarize(results)
    return results


def _without_epochs(client: dict) -> dict:
    return {key: value for key, value in client.items() if key != "epochs"}


def merge_seeds(parts: list[dict]) -> dict:
    """One cell's results from its seeds' runs, as one `edgefed simulate --seeds N` would write
    them (the clients, their data and the settings are the same in every part but the seed)."""
    from edgefed.simulation.run import summarize

    results = {key: value for key, value in parts[0].items() if key not in ("minutes", "summary")}
    results["settings"] = results["settings"] | {"seeds": len(parts), "first_seed": 0}
    results["runs"] = {
        label: {seed: rounds for part in parts for seed, rounds in part["runs"][label].items()}
        for label in parts[0]["runs"]
    }
    results["summary"] = summarize(results)
    return results


def paired(values: list[float], baseline: list[float]) -> tuple[float, float, float | None]:
    """(mean gain, std of the per-seed gains, gain in paired σ) of per-seed mean perplexities;
    gains as shares of the baseline's perplexity, positive when `values` are better."""
    gains = [1 - v / b for v, b in zip(values, baseline, strict=True)]
    mean = statistics.fmean(gains)
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    return mean, spread, (mean / spread if spread > 0 else None)


def separation(results: dict, label: str) -> float | None:
    """Median over devices, peers and seeds of |peer's score − own score| / its standard error
    in the last round: how many standard errors apart the scheme's scores are."""
    ratios = []
    for rounds in results["runs"][label].values():
        for device in rounds[-1]["devices"].values():
            scores, errors = device.get("scores") or [], device.get("errors") or []
            ratios += [abs(s - scores[0]) / e for s, e in zip(scores[1:], errors[1:], strict=False)
                       if e]  # fmt: skip
    return statistics.median(ratios) if ratios else None


def seed_means_by_round(results: dict, label: str) -> list[list[float]]:
    """Per round, per seed: the mean over clients of the test perplexity of the devices' mixes."""
    seeds = results["runs"][label].values()
    return [
        [statistics.fmean(d["perplexity"]["aggregated"] for d in rounds[r]["devices"].values())
         for rounds in seeds]
        for r in range(results["settings"]["rounds"])
    ]  # fmt: skip


def base_perplexity(results: dict) -> float:
    """Mean over seeds and clients of the bare base's test perplexity (no adapter)."""
    rounds_by_seed = next(iter(results["runs"].values())).values()
    return statistics.fmean(device["perplexity"]["base"] for rounds in rounds_by_seed
                            for device in rounds[-1]["devices"].values())  # fmt: skip


def cell_rows(results: dict, cell: dict) -> list[dict]:
    summary = results["summary"]
    clients = len(results["clients"])
    epochs_done = [c["epochs"] for c in results["clients"] if c.get("epochs") is not None]
    fedavg_by_round = seed_means_by_round(results, "fedavg")
    rows = []
    for label, row in summary.items():
        by_round = [
            {"mean": statistics.fmean(means), **dict(zip(("gain_over_fedavg", "gain_std",
             "paired_sigmas_over_fedavg"), paired(means, fedavg), strict=True))}
            for means, fedavg in zip(seed_means_by_round(results, label), fedavg_by_round,
                                     strict=True)
        ]  # fmt: skip
        local, fedavg, oracle = (
            paired(row["seed_means"], summary[b]["seed_means"]) if b in summary else None
            for b in ("local", "fedavg", "oracle")
        )
        target = None
        if label.split(":")[0] in TARGET_SCHEMES:
            target = bool(
                local[2] is not None and local[2] > 2
                and fedavg[2] is not None and fedavg[2] > 2
                and row["beats_local"] >= 0.9 * clients
            )  # fmt: skip
        rows.append({
            "dataset": cell["dataset"], "docs": cell["docs"], "epochs": cell["epochs"],
            "rounds": results["settings"]["rounds"], "schedule": cell.get("schedule", "even"),
            "epochs_done": statistics.fmean(epochs_done) if epochs_done else None,
            "train_tokens": statistics.fmean(c["train_tokens"] for c in results["clients"]),
            "minutes": cell.get("minutes"), "seeds": results["settings"]["seeds"],
            "base": base_perplexity(results),
            "trust": label, "mean": row["mean"], "std": row["std"],
            "gain_over_local": local[0], "gain_over_local_std": local[1],
            "paired_sigmas_over_local": local[2],
            "gain_over_fedavg": fedavg[0], "gain_over_fedavg_std": fedavg[1],
            "paired_sigmas_over_fedavg": fedavg[2],
            "gap_to_oracle": None if oracle is None else -oracle[0],
            "beats_local": row["beats_local"], "clients": clients, "target_met": target,
            "separation": separation(results, label), "by_round": by_round,
        })  # fmt: skip
    return rows


def finished_cells(work: Path) -> list[dict]:
    rows = []
    for results_file in sorted(work.glob("*/*/results.json")):
        cell = json.loads((results_file.parent / CELL_FILE).read_text())
        results = json.loads(results_file.read_text())
        if not BASELINES.issubset(results["summary"]):
            print(f"{results_file.parent}: left out, it has no local or FedAvg run to measure "
                  "the gains against", file=sys.stderr)  # fmt: skip
            continue
        rows += cell_rows(results, cell)
    return sorted(rows, key=lambda r: (r["dataset"], r["docs"], r["rounds"], r["epochs"]))


def print_tables(rows: list[dict]) -> None:
    def sigmas(value):
        return "–" if value is None else f"{value:+.1f}"

    def cell_of(row: dict) -> tuple:
        return row["dataset"], row["docs"], row["epochs"], row["rounds"], row["schedule"]

    for key in dict.fromkeys(cell_of(r) for r in rows):
        dataset, docs, epochs, rounds, schedule = key
        shared = "the default schedule" if schedule == "default" else "shared equally"
        part = [r for r in rows if cell_of(r) == key]
        first = part[0]
        done = f"{first['epochs_done']:.1f}" if first["epochs_done"] is not None else "?"
        print(f"\n**{dataset}, {docs} documents per client ({first['train_tokens']:.0f} train "
              f"tokens), {epochs:g} epochs ({done} done) in {rounds} round(s) ({shared}), "
              f"{first['seeds']} seeds, {first['minutes'] or 0:.0f} min; the bare base: "
              f"{first['base']:.3f}**\n")  # fmt: skip
        print("| trust | test ppl (mean ± std) | vs local | vs FedAvg | paired σ over local / "
              "FedAvg | beats local | gap to oracle | scores apart (SE) | target |")  # fmt: skip
        print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- |")
        for r in part:
            gap = "–" if r["gap_to_oracle"] is None else f"{r['gap_to_oracle']:+.2%}"
            target = {None: "", True: "met", False: "not met"}[r["target_met"]]
            apart = "–" if r["separation"] is None else f"{r['separation']:.1f}"
            print(f"| {r['trust']} | {r['mean']:.3f} ± {r['std']:.3f} | "
                  f"{r['gain_over_local']:+.2%} | {r['gain_over_fedavg']:+.2%} | "
                  f"{sigmas(r['paired_sigmas_over_local'])} / "
                  f"{sigmas(r['paired_sigmas_over_fedavg'])} | "
                  f"{r['beats_local']}/{r['clients']} | {gap} | {apart} | {target} |")  # fmt: skip
        if rounds > 1:
            print("\nAfter each round: mean test perplexity, and the gain over FedAvg's after the "
                  "same round (paired σ)\n")  # fmt: skip
            print("| trust | " + " | ".join(f"round {n}" for n in range(rounds)) + " |")
            print("| --- |" + " ---: |" * rounds)
            for r in part:
                after = [
                    f"{b['mean']:.3f} ({b['gain_over_fedavg']:+.2%}, "
                    f"{sigmas(b['paired_sigmas_over_fedavg'])})"
                    for b in r["by_round"]
                ]
                print(f"| {r['trust']} | " + " | ".join(after) + " |")


def map_panels(rows: list[dict]) -> list[tuple[str, str, str, dict, list[dict]]]:
    """The map's panels, two axes per federation: data per device (documents, at a fixed
    training) and training per device (epochs, at a fixed data size). A gain over local shows
    where collaboration pays; the same gain over FedAvg, where personalising beats averaging.
    A panel needs at least two points on its axis, so a lone cell shows only in the tables.
    Each panel: (dataset, axis, baseline, the fixed settings, its rows)."""
    panels = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        part = [r for r in rows if r["dataset"] == dataset]
        for axis, fixed in (("docs", ("epochs", "rounds")), ("epochs", ("docs", "rounds"))):
            for key in dict.fromkeys(tuple(r[f] for f in fixed) for r in part):
                line = [r for r in part if tuple(r[f] for f in fixed) == key]
                if len({r[axis] for r in line}) < 2:
                    continue
                where = dict(zip(fixed, key, strict=True))
                for baseline in ("local", "fedavg"):
                    panels.append((dataset, axis, baseline, where, line))
    return panels


def write_plot(rows: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = map_panels(rows)
    if not panels:
        print("\nno plot: no federation has two cells along data or training yet")
        return False
    # one colour per variant in every panel, so a line is the same variant wherever it is
    labels = list(dict.fromkeys(r["trust"] for r in rows if r["trust"] != "local"))
    datasets = list(dict.fromkeys(p[0] for p in panels))
    columns = max(sum(p[0] == dataset for p in panels) for dataset in datasets)
    fig, axes = plt.subplots(len(datasets), columns, figsize=(4.2 * columns, 3.4 * len(datasets)),
                             squeeze=False)  # fmt: skip
    axis_names = {"docs": "documents per client", "epochs": "epochs per device (over all rounds)"}
    for i, dataset in enumerate(datasets):
        mine = [p for p in panels if p[0] == dataset]
        for j, (_, axis, baseline, where, part) in enumerate(mine):
            ax = axes[i][j]
            for label in dict.fromkeys(r["trust"] for r in part):
                if label in ("local", baseline):
                    continue
                line = sorted((r for r in part if r["trust"] == label), key=lambda r: r[axis])
                ax.errorbar([r[axis] for r in line],
                            [100 * r[f"gain_over_{baseline}"] for r in line],
                            yerr=[100 * r[f"gain_over_{baseline}_std"] for r in line],
                            marker="o", capsize=3, label=label,
                            color=f"C{labels.index(label) % 10}",
                            linestyle="--" if label in ("fedavg", "oracle") else "-")  # fmt: skip
            ax.axhline(0, color="black", linewidth=0.8)
            ax.legend(fontsize="xx-small")
            ax.set_xscale("log")
            ticks = sorted({r[axis] for r in part})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel(axis_names[axis])
            versus = "FedAvg" if baseline == "fedavg" else "local"
            ax.set_ylabel(f"test perplexity gain over {versus} (%)", fontsize="small")
            fixed = ", ".join(f"{k} {v:g}" for k, v in where.items())
            ax.set_title(f"{dataset} ({fixed})", fontsize="small")
        for j in range(len(mine), columns):
            axes[i][j].axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="cells' run folders, reused")
    parser.add_argument("--datasets", default="code-prose-mixed,bbc-mixed")
    parser.add_argument("--docs", default="10,20,60", help="documents per client")
    parser.add_argument("--epochs", default="1,3,10",
                        help="epochs per device over all rounds, shared equally by them; "
                        "'default': the federation's default schedule")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--trust", default=DEFAULT_VARIANTS)
    parser.add_argument("--val-tokens", type=int, default=1024)
    parser.add_argument("--test-tokens", type=int, default=1024)
    parser.add_argument("--report-only", action="store_true", help="run nothing, report")
    parser.add_argument("--plot", type=Path, help="write the map here")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if not BASELINES.issubset(v.split(":")[0] for v in args.trust.split(",")):
        parser.error("--trust must include local and fedavg: the map's gains are measured "
                     "against them")  # fmt: skip

    if not args.report_only:
        for dataset in args.datasets.split(","):
            for docs in (int(d) for d in args.docs.split(",")):
                for epochs in (None if e == "default" else float(e)
                               for e in args.epochs.split(",")):  # fmt: skip
                    folder = cell_dir(args.work, dataset, docs, epochs, args.rounds)
                    run_cell(folder, dataset, docs, epochs, args)
    rows = finished_cells(args.work)
    print_tables(rows)
    if args.plot and write_plot(rows, args.plot):
        print(f"\nplot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
