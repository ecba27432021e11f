"""Benchmark of `magpie-teach evaluate`'s judge (not a test): judgements/s through an OpenAI-compatible server against
direct generation of the same tokens, in one run.

    python benchmarks/bench_judge.py [--judgements 192] [--model tiny|smollm2|PATH] [--concurrency 8]

A judgement is one verdict: the judge prompt (`JUDGE_PROMPT` with an instruction and two answers, rendered with
the judge's chat template) and one generated token with its top 20 log-probabilities. Three ways, same prompts:

* **server**: `evaluate`'s `OpenAIJudge` against `vllm serve` of the model on 127.0.0.1 (the vLLM venv, `make
  vllm`), `--concurrency` requests in flight, as `evaluate --judge-backend openai` runs it;
* **direct**: the same vLLM engine in one process (`vllm.LLM.generate`, max_tokens 1, logprobs 20) on all prompts
  at once: the same tokens with no HTTP, no JSON and no per-request scheduling. The ratio server/direct is the
  price of the server path;
* **transformers**: `evaluate`'s `TransformersJudge` (one forward pass per batch of 8, the whole next-token
  distribution), the default backend.

Model loads and server start-up are not timed. The answers are texts from the shipped sample responses, so the
prompts have realistic lengths (about 150-400 tokens with the tiny tokenizer).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".vllm-venv" / "bin" / "python"

DIRECT = """
import json, sys, time
from vllm import LLM, SamplingParams
model, prompts_file = sys.argv[1], sys.argv[2]
prompts = json.load(open(prompts_file))
engine = LLM(model, dtype="float32", max_model_len=2048, enforce_eager=True, seed=0)
tokenizer = engine.get_tokenizer()
texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
engine.generate(texts[:4], params, use_tqdm=False)  # warm-up, as the server has served its health checks
start = time.perf_counter()
outputs = engine.generate(texts, params, use_tqdm=False)
elapsed = time.perf_counter() - start
print("RESULT " + json.dumps({"seconds": elapsed, "n": len(outputs), "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs)}))
"""


def _triples(n: int) -> list[tuple[str, str, str]]:
    from magpie_teach.artefacts import sample_responses_path

    rows = [json.loads(line) for line in Path(sample_responses_path()).read_text().splitlines()]
    return [(rows[i % len(rows)]["instruction"], rows[i % len(rows)]["response"], rows[(i * 7 + 3) % len(rows)]["response"])
            for i in range(n)]  # fmt: skip


def _serve(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    from tests.processes import free_port

    port = free_port()
    process = subprocess.Popen([str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                                "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--dtype",
                                "float32", "--enforce-eager", "--seed", "0"],
                               env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=open(log, "w"),
                               stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return process, f"http://127.0.0.1:{port}/v1"
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"vllm serve did not start; see {log}")
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judgements", type=int, default=192)
    parser.add_argument("--model", default="tiny", help="tiny, smollm2, or a local model folder")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight to the server")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    from magpie_teach.evaluation.evaluate import OpenAIJudge, TransformersJudge, judge_messages
    from tests.processes import stop_group

    if not VLLM_PYTHON.exists():
        raise SystemExit("the vLLM venv is missing: run `make vllm`")
    root = Path(tempfile.mkdtemp(prefix="bench-judge-"))
    if args.model == "tiny":
        from magpie_teach.tiny import build_tiny_causal_lm, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        model = root / "model"
        build_tiny_causal_lm(tokenizer, "l").save_pretrained(model)
        tokenizer.save_pretrained(model)
    elif args.model == "smollm2":
        from magpie_teach.demo.models import models_cache, smollm2

        model = Path(smollm2(models_cache()))
    else:
        model = Path(args.model)
    triples = _triples(args.judgements)
    prompts_file = root / "prompts.json"
    prompts_file.write_text(json.dumps([judge_messages(*t) for t in triples]))

    direct = subprocess.run([str(VLLM_PYTHON), "-c", DIRECT, str(model), str(prompts_file)], capture_output=True,
                            text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})  # fmt: skip
    if direct.returncode:
        raise SystemExit(direct.stderr[-3000:])
    direct = json.loads(next(line for line in direct.stdout.splitlines() if line.startswith("RESULT "))[7:])

    server, url = _serve(model, root / "vllm-serve.log")
    try:
        judge = OpenAIJudge(str(model), url, "OPENAI_API_KEY", concurrency=args.concurrency)
        judge.p_first(triples[:4])  # warm-up
        start = time.perf_counter()
        verdicts = judge.p_first(triples)
        served = time.perf_counter() - start
    finally:
        stop_group(server)

    local = TransformersJudge(str(model), "cpu", "float32", 8, root / "cache")
    local.p_first(triples[:8])  # warm-up
    start = time.perf_counter()
    local.p_first(triples)
    in_process = time.perf_counter() - start

    n = len(triples)
    print(f"model {model.name if args.model not in ('tiny', 'smollm2') else args.model}, {n} judgements, "
          f"{direct['prompt_tokens'] / n:.0f} prompt tokens each on average")  # fmt: skip
    print(f"direct (vLLM engine, one call):       {n / direct['seconds']:8.1f} judgements/s")
    print(f"server (OpenAIJudge, {args.concurrency} in flight):     {n / served:8.1f} judgements/s   "
          f"{direct['seconds'] / served:.2f}x direct")  # fmt: skip
    print(f"transformers (TransformersJudge, b=8): {n / in_process:8.1f} judgements/s   "
          f"{direct['seconds'] / in_process:.2f}x direct")  # fmt: skip
    unread = sum(v is None for v in verdicts)
    print(
        f"server verdicts unreadable (neither letter among the top 20, nor the reply's first character): {unread} of {n}"
    )


if __name__ == "__main__":
    main()
