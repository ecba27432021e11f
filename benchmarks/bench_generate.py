"""Benchmark of `magpie-teach generate` (not a test): responses/s of the multi-teacher pipeline against calling the
same backend directly on the same prompts with the same batch size, in one run. Target: >= 0.8.

    python benchmarks/bench_generate.py [--instructions 96] [--max-new-tokens 64] [--batch-size 8]

Backend: the pipeline's own LLM class (`BatchedTransformersLLM`: distilabel's TransformersLLM generating each
batch in one padded call) on a tiny Llama (size "l"), greedy. "direct" loads that LLM and calls its
`generate` batch by batch in this process; "pipeline" is `magpie_teach.generation.run.generate` (a
distilabel pipeline with the response store), both timed end to end including the model load. For
reference it also times distilabel's stock TransformersLLM, which generates one prompt at a time.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instructions", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import pandas as pd

    from magpie_teach.generation.config import GenerateConfig, InstructionsConfig, SamplingConfig, TeacherConfig
    from magpie_teach.tiny import build_tiny_causal_lm, build_tiny_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    tokenizer = build_tiny_tokenizer()
    model = root / "model"
    build_tiny_causal_lm(tokenizer, "l").save_pretrained(model)
    tokenizer.save_pretrained(model)
    sample = pd.read_json(REPO / "src" / "magpie_teach" / "resources" / "sample_responses.jsonl", lines=True)
    prompts = [f"{x} (variant {i})" for i, x in enumerate((sample["instruction"].tolist() * 10)[: args.instructions])]
    pd.DataFrame({"instruction": prompts}).to_json(root / "instructions.jsonl", orient="records", lines=True)

    # pipeline first: its forked workers must not inherit a torch thread pool this process has used
    config = GenerateConfig(
        output_dir=str(root / "out"),
        instructions=InstructionsConfig(path=str(root / "instructions.jsonl")),
        teachers=[TeacherConfig("tiny", str(model), sampling=SamplingConfig(max_new_tokens=args.max_new_tokens))],
        batch_size=args.batch_size,
    )
    from magpie_teach.generation.run import generate

    start = time.perf_counter()
    summary = generate(config)
    pipeline_s = time.perf_counter() - start
    produced = summary["teachers"]["tiny"]["rows"]

    from distilabel.models import TransformersLLM

    from magpie_teach.generation.llms import BatchedTransformersLLM

    def direct_run(cls: type) -> tuple[int, float]:
        start = time.perf_counter()
        llm = cls(model=str(model), device="cpu")
        llm.load()
        done = 0
        for i in range(0, len(prompts), args.batch_size):
            batch = [[{"role": "user", "content": p}] for p in prompts[i : i + args.batch_size]]
            out = llm.generate(inputs=batch, num_generations=1, max_new_tokens=args.max_new_tokens, do_sample=False,
                               repetition_penalty=1.0)  # fmt: skip
            done += len(out)
        return done, time.perf_counter() - start

    direct, direct_s = direct_run(BatchedTransformersLLM)
    stock, stock_s = direct_run(TransformersLLM)

    print(
        f"{len(prompts)} instructions, batch {args.batch_size}, {args.max_new_tokens} new tokens, greedy, tiny Llama 'l'"
    )
    print(f"stock TransformersLLM.generate:   {stock} responses in {stock_s:.1f}s = {stock / stock_s:.2f} responses/s")
    print(
        f"direct BatchedTransformersLLM:    {direct} responses in {direct_s:.1f}s = {direct / direct_s:.2f} responses/s"
    )
    print(
        f"magpie-teach generate pipeline:   {produced} responses in {pipeline_s:.1f}s = {produced / pipeline_s:.2f} responses/s"
    )
    print(f"ratio pipeline / direct: {(produced / pipeline_s) / (direct / direct_s):.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
