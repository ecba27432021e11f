"""Benchmark of `magpie-teach train` (not a test): training tokens/s against a bare TRL SFTTrainer script on
the same data and recipe, in one run. Target: ratio >= 0.95.

    python benchmarks/bench_train.py [--steps 40] [--repeats 2]

Both runs train the same tiny Llama (size "l") for the same steps on the shipped sample selected as
SFT data. Runs alternate (bare, ours, bare, ours, ...) and the best of each is kept, to damp noise.
Tokens/s is the trainer's own count of input tokens over its train_runtime; wall time adds setup.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny" / "sft" / "config_cpu.yaml"


def bare(model: str, data: str, out: str, steps: int) -> tuple[float, float, int]:
    """What a user would write without magpie-teach: the same recipe values, passed to SFTTrainer directly."""
    import yaml
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    values = yaml.safe_load(RECIPE.read_text())
    for key in ("model_name_or_path", "dataset_name", "dtype"):
        values.pop(key)
    values.update(output_dir=out, max_steps=steps, save_strategy="no")
    start = time.perf_counter()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**values),
        train_dataset=load_dataset(data, split="train"),
        processing_class=AutoTokenizer.from_pretrained(model),
    )
    result = trainer.train()
    wall = time.perf_counter() - start
    return result.metrics["train_runtime"], wall, int(trainer.state.num_input_tokens_seen)


def ours(model: str, data: str, out: str, steps: int) -> tuple[float, float, int]:
    from magpie_teach.training.sft import parse_recipe, train

    start = time.perf_counter()
    result = train(*parse_recipe(str(RECIPE), ["--model_name_or_path", model, "--dataset_name", data, "--output_dir", out,
                                               "--max_steps", str(steps), "--save_strategy", "no"]))  # fmt: skip
    return result.train_runtime, time.perf_counter() - start, result.train_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import pandas as pd
    from transformers.utils import logging as hf_logging

    from magpie_teach.selection.select import SelectConfig, select
    from magpie_teach.tiny import build_tiny_causal_lm, build_tiny_tokenizer

    hf_logging.set_verbosity_error()
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    tokenizer = build_tiny_tokenizer()
    model = root / "model"
    build_tiny_causal_lm(tokenizer, "l").save_pretrained(model)
    tokenizer.save_pretrained(model)
    rows = pd.read_json(REPO / "src" / "magpie_teach" / "resources" / "sample_responses.jsonl", lines=True)
    rows.assign(base_model="m", reward=1.0, compat_loss=1.0, truncated=False).to_parquet(root / "scores.parquet")
    data = str(
        select(
            SelectConfig(scores=str(root), output_dir=str(root / "data"), teacher="tiny-teacher-thorough")
        ).output_dir
    )

    results = {"bare SFTTrainer": [], "magpie-teach train": []}
    for i in range(args.repeats):
        for name, run in (("bare SFTTrainer", bare), ("magpie-teach train", ours)):
            results[name].append(run(str(model), data, str(root / f"out-{name[:4]}-{i}"), args.steps))
    print(
        f"{args.steps} steps of the tiny recipe (batch 4, max length 512) on a {sum(p.numel() for p in __import__('transformers').AutoModelForCausalLM.from_pretrained(model).parameters()) / 1e6:.1f}M-parameter Llama, best of {args.repeats}"
    )
    print(f"{'':22s}{'tokens':>8s}{'train s':>9s}{'tokens/s':>10s}{'wall s':>8s}")
    best = {}
    for name, runs in results.items():
        runtime, wall, tokens = min(runs, key=lambda r: r[0])
        best[name] = tokens / runtime
        print(f"{name:22s}{tokens:8d}{runtime:9.2f}{tokens / runtime:10.0f}{min(r[1] for r in runs):8.2f}")
    print(f"ratio magpie-teach / bare: {best['magpie-teach train'] / best['bare SFTTrainer']:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
