"""Benchmark of `rank` at the Generator-Zoo's scale (not a test): memory against the size of the data, the Ray
path's throughput against the local engine, and what the full Zoo costs on GPUs.

    python benchmarks/bench_scale.py memory [--instructions 2000 40000 100000] [--sample 1000] [--work DIR]
    python benchmarks/bench_scale.py ray [--rows 6000] [--workers 2] [--work DIR]
    python benchmarks/bench_scale.py extrapolate [--mfu 0.4] [--work DIR]
    python benchmarks/bench_scale.py select [--instructions 2000 20000] [--work DIR]
    python benchmarks/bench_scale.py full [--instructions 1000 5000] [--ray] [--work DIR]

Builds folders in the exact layout of ``Magpie-Align/Magpie-100K-Generator-Zoo`` (ten parquet shards
``data/train-0000K-of-00010.parquet``; one row per instruction with ``uuid``, ``instruction`` and one struct
column per teacher, named as the Zoo's 19 teachers, holding ``content`` and the three reward fields), with
responses of 50 to 500 words (log-uniform; about 2.4 GB of parquet for 100K instructions, as the real Zoo), once
per size under ``--work`` (reused by later runs). Then runs ``magpie-teach rank --reward-column
ArmoRM-Llama3-8B-v0.1 --sample N --max-length 128`` under a tiny base model on each (the short
``--max-length`` keeps the scoring, which is the same at every size, from taking most of the time), each in a fresh process, and prints its
peak resident memory (VmHWM), wall time, and the ratio of each peak to the smallest size's, measured in the
same run. The goal (issue 13): at the same ``--sample``, memory does not grow with the data (a 40K file within
1.3x of a 2K one) and the full 1.9M-response Zoo ranks within 2 GB.

``ray`` starts a Ray head on 127.0.0.1 with this machine's cores and ranks the same rows (a ``--sample`` of the
2K Zoo-layout folder) twice without the cache: with the local engine (torch on every core) and with
``--ray-address`` and ``--workers`` actors of one core each; it prints rows/s of both and their ratio (goal:
at least 0.85x on this machine, where the Ray path's overhead is all there is to see).

``select`` turns each Zoo-layout folder into a `rank` scores file (one row per response: its text, the
ArmoRM reward, a compatibility loss drawn at random) and runs ``magpie-teach select --strategy best-of-n``
on it in a fresh process: its peak memory, against the peak of reading the same file whole with pandas (what
`select` did before it streamed) measured in the same run, and the ratio of each size's peak to the smallest
size's.

``full`` ranks every response (no ``--sample``; the score cache on, in a fresh folder per run) of each
Zoo-layout folder under a tiny base model with ``--reward-column``, twice in fresh processes: in windows of
``MAGPIE_TEACH_WINDOW_ROWS`` (default 20,000) responses, and in one window (the whole data in memory, as `rank`
scored before it streamed). It prints both peaks, their ratio, and the windowed peak against the smallest size's.
With ``--ray`` both runs score on a Ray head on 127.0.0.1 (``--workers`` actors): the peak is the driver's.

``extrapolate`` measures the tokens one response costs the engine (the conversation, the response alone for
L(y), and the instruction for L(x), with a real tokenizer when one is cached, else the tiny one) on the Zoo-layout
data, and prints the hours the full Zoo (1.9M responses) takes under the paper's five base models on 1, 8 and 64
GPUs at 2 x parameters x tokens FLOPs, at a stated share (``--mfu``) of an H100's dense bf16 peak, with the Ray
path's measured efficiency (``--efficiency``, from ``ray``) applied to the 8- and 64-GPU figures.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_names import ZOO_COLUMNS as ZOO_TEACHERS  # noqa: E402  (the Zoo's 19 column names)

REWARDS = ["ArmoRM-Llama3-8B-v0.1", "Skywork-Reward-Llama-3.1-8B", "Skywork-Reward-Gemma-2-27B"]
SHARDS = 10
ROW_GROUP = 1000  # instructions per row group


def build_zoo(folder: Path, n_instructions: int, seed: int = 0) -> Path:
    """The Zoo layout with N instructions (see the module docstring), written shard by shard, row group by
    row group, so that building it needs little memory; reused when already complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from magpie_teach.tiny import shipped_texts

    done = folder / "built.json"
    if done.exists() and json.loads(done.read_text()) == {"instructions": n_instructions, "seed": seed}:
        return folder
    words = " ".join(shipped_texts()).split()
    rng = np.random.default_rng(seed)
    text = " ".join(words[int(i)] for i in rng.integers(0, len(words), 600_000))
    starts = np.flatnonzero(np.frombuffer(text.encode(), dtype=np.uint8) == ord(" ")) + 1
    reward_type = pa.struct([("content", pa.string()), *[(name, pa.float64()) for name in REWARDS]])
    schema = pa.schema([("uuid", pa.string()), ("instruction", pa.string()),
                        *[(teacher, reward_type) for teacher in ZOO_TEACHERS]])  # fmt: skip

    def passage(n_words: int) -> str:
        first = int(rng.integers(0, len(starts) - n_words - 1))
        return text[starts[first] : starts[first + n_words] - 1]

    (folder / "data").mkdir(parents=True, exist_ok=True)
    per_shard = math.ceil(n_instructions / SHARDS)
    made = 0
    for shard in range(SHARDS):
        path = folder / "data" / f"train-{shard:05d}-of-{SHARDS:05d}.parquet"
        with pq.ParquetWriter(path, schema) as writer:
            stop = min(n_instructions, made + per_shard)
            while made < stop:
                n = min(ROW_GROUP, stop - made)
                columns = {
                    "uuid": [f"{seed:02d}-{made + i:08d}" for i in range(n)],
                    "instruction": [passage(int(rng.integers(4, 16))) + "?" for _ in range(n)],
                }
                for teacher in ZOO_TEACHERS:
                    lengths = np.exp(rng.uniform(math.log(50), math.log(500), n)).astype(int)
                    columns[teacher] = [
                        {"content": passage(int(k)), REWARDS[0]: float(rng.normal(0.1, 0.03)),
                         REWARDS[1]: float(rng.normal(0, 8)), REWARDS[2]: float(rng.normal(0, 8))}
                        for k in lengths
                    ]  # fmt: skip
                writer.write_table(pa.table(columns, schema=schema))
                made += n
    done.write_text(json.dumps({"instructions": n_instructions, "seed": seed}))
    return folder


RUN = """
import sys
from magpie_teach.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("PEAK_KB", int(peak.split()[1]), file=sys.stderr)
sys.exit(code)
"""


def rank_peak(data: Path, base: str, sample: int, out: Path) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one `rank` run in a fresh process."""
    argv = ["rank", "--data", str(data), "--base-model", base, "--reward-column", REWARDS[0],
            "--sample", str(sample), "--output", str(out), "--no-cache", "--max-length", "128"]  # fmt: skip
    return _peak(RUN, *argv)


def memory(args: argparse.Namespace) -> None:
    from magpie_teach.tiny import build_tiny_suite

    work = Path(args.work)
    base = build_tiny_suite(work / "models").base_small
    print(f"rank --reward-column {REWARDS[0]} --sample {args.sample} --max-length 128, tiny base model; Zoo layout, "
          f"{len(ZOO_TEACHERS)} teachers, responses 50-500 words", flush=True)  # fmt: skip
    results = []
    for n in args.instructions:
        start = time.perf_counter()
        folder = build_zoo(work / f"zoo-{n}", n)
        built = time.perf_counter() - start
        size = sum(p.stat().st_size for p in folder.rglob("*.parquet")) / 1e9
        peak, wall = rank_peak(folder, base, args.sample, work / f"out-{n}")
        results.append((n, peak))
        print(f"{n:>7} instructions ({n * len(ZOO_TEACHERS):>9,} responses, {size:.2f} GB parquet"
              f"{f', built in {built:.0f}s' if built > 1 else ''}): peak RSS {peak:,.0f} MB, "
              f"{peak / results[0][1]:.2f}x the {results[0][0]}-instruction run, rank took {wall:.0f}s", flush=True)  # fmt: skip


def full(args: argparse.Namespace) -> None:
    import contextlib

    from magpie_teach.tiny import build_tiny_suite
    from tests.processes import ray_head

    work = Path(args.work)
    base = build_tiny_suite(work / "models").base_small
    print(f"rank --reward-column {REWARDS[0]} --max-length 128 (every response), tiny base model; Zoo layout, "
          f"{len(ZOO_TEACHERS)} teachers{f'; on a Ray head, {args.workers} actors' if args.ray else ''}", flush=True)  # fmt: skip
    with ray_head(work, num_cpus=os.cpu_count() or 1) if args.ray else contextlib.nullcontext() as address:
        extra = ["--ray-address", address, "--num-workers", str(args.workers)] if args.ray else []
        _full(args, work, base, extra)


def _full(args: argparse.Namespace, work: Path, base: str, extra: list[str]) -> None:
    first = None
    for n in args.instructions:
        folder = build_zoo(work / f"zoo-{n}", n)
        peaks = {}
        for label, window in (("windows", os.environ.get("MAGPIE_TEACH_WINDOW_ROWS", "20000")), ("one window", "0")):
            run = work / f"full-{n}-{label.replace(' ', '-')}{'-ray' if extra else ''}"
            shutil.rmtree(run, ignore_errors=True)  # a fresh cache: every response scored
            argv = ["rank", "--data", str(folder), "--base-model", base, "--reward-column", REWARDS[0],
                    "--output", str(run / "out"), "--cache-dir", str(run / "cache"), "--max-length", "128", *extra]  # fmt: skip
            env = {**os.environ, "MAGPIE_TEACH_WINDOW_ROWS": window}
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", RUN, *argv], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"failed: {' '.join(argv)}\n{done.stderr[-3000:]}")
            kb = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_KB"))
            peaks[label] = (kb / 1024, time.perf_counter() - start)
        (peak, wall), (whole, whole_wall) = peaks["windows"], peaks["one window"]
        first = first or peak
        print(f"{n:>6} instructions ({n * len(ZOO_TEACHERS):>8,} responses): windows {peak:,.0f} MB in {wall:.0f}s, "
              f"one window {whole:,.0f} MB in {whole_wall:.0f}s ({peak / whole:.2f}x); windows {peak / first:.2f}x "
              f"the first size", flush=True)  # fmt: skip


def build_scores(zoo: Path, file: Path) -> Path:
    """A `rank` scores file from a Zoo-layout folder (see the module docstring), row group by row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if file.exists():
        return file
    rng = np.random.default_rng(0)
    tmp = file.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, pa.schema([
        ("id", pa.string()), ("teacher", pa.string()), ("base_model", pa.string()), ("instruction", pa.string()),
        ("response", pa.string()), ("reward", pa.float64()), ("compat_loss", pa.float64()),
        ("n_tokens_full", pa.int64()), ("truncated", pa.bool_()), ("status", pa.string()),
    ])) as writer:  # fmt: skip
        for shard in sorted((zoo / "data").glob("*.parquet")):
            source = pq.ParquetFile(shard)
            for group in range(source.num_row_groups):
                rows = source.read_row_group(group)
                for teacher in ZOO_TEACHERS:
                    struct = rows.column(teacher).combine_chunks()
                    n = len(rows)
                    writer.write_table(pa.table({
                        "id": rows.column("uuid"), "teacher": pa.array([teacher] * n), "base_model": pa.array(["tiny"] * n),
                        "instruction": rows.column("instruction"), "response": struct.field("content"),
                        "reward": struct.field(REWARDS[0]), "compat_loss": pa.array(rng.uniform(1.0, 3.0, n)),
                        "n_tokens_full": pa.array(rng.integers(60, 700, n)), "truncated": pa.array([False] * n),
                        "status": pa.array(["ok"] * n),
                    }, schema=writer.schema))  # fmt: skip
    tmp.rename(file)
    return file


WHOLE = """
import sys
import pandas as pd
frame = pd.read_parquet(sys.argv[1])
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("PEAK_KB", int(peak.split()[1]), file=sys.stderr)
"""


def _peak(code: str, *argv: str) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of CODE run with ARGV in a fresh process (CODE prints PEAK_KB on stderr)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{done.stderr[-3000:]}")
    kb = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_KB"))
    return kb / 1024, wall


def select_memory(args: argparse.Namespace) -> None:
    work = Path(args.work)
    print("select --strategy best-of-n on rank scores files built from Zoo-layout folders (19 teachers, responses "
          "50-500 words)", flush=True)  # fmt: skip
    first = None
    for n in args.instructions:
        scores = build_scores(build_zoo(work / f"zoo-{n}", n), work / f"scores-{n}.parquet")
        peak, wall = _peak(RUN, "select", "--scores", str(scores), "--strategy", "best-of-n", "--output",
                           str(work / f"select-{n}"))  # fmt: skip
        whole, _ = _peak(WHOLE, str(scores))
        first = first or peak
        print(f"{n:>7} instructions ({n * len(ZOO_TEACHERS):>9,} scored responses, "
              f"{scores.stat().st_size / 1e9:.2f} GB): select peak RSS {peak:,.0f} MB ({peak / first:.2f}x the "
              f"smallest), reading the file whole {whole:,.0f} MB ({peak / whole:.2f}x of it); select took "
              f"{wall:.0f}s", flush=True)  # fmt: skip


def _timed_rank(argv: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "magpie_teach.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"rank failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def ray(args: argparse.Namespace) -> None:
    """Rows/s of the Ray path with N one-core actors against the local engine on the same cores."""
    from magpie_teach.tiny import build_tiny_suite
    from tests.processes import ray_head

    work = Path(args.work)
    base = build_tiny_suite(work / "models").base_small
    folder = build_zoo(work / "zoo-2000", 2000)
    sample = max(1, args.rows // len(ZOO_TEACHERS))
    rows = sample * len(ZOO_TEACHERS)
    common = ["rank", "--data", str(folder), "--base-model", base, "--reward-column", REWARDS[0], "--sample",
              str(sample), "--max-length", "256", "--bootstrap", "0", "--no-cache"]  # fmt: skip
    cores = os.cpu_count() or 1
    with ray_head(work, num_cpus=cores) as address:
        _timed_rank(
            [*common, "--ray-address", address, "--num-workers", str(args.workers), "--output", str(work / "ray-warm")]
        )  # fmt: skip  (the cluster's workers start once)
        results = {}
        for name, extra in (("local", []), ("ray", ["--ray-address", address, "--num-workers", str(args.workers)])):
            wall = _timed_rank([*common, *extra, "--output", str(work / f"ray-{name}")])
            results[name] = rows / wall
            print(f"{name:>5}: {rows} responses ranked in {wall:.1f}s: {results[name]:.1f} rows/s", flush=True)
    print(f"ray/local: {results['ray'] / results['local']:.2f}x ({args.workers} one-core actors against torch on "
          f"{cores} cores; goal >= 0.85x)")  # fmt: skip


PAPER_BASES = {  # parameters (billions), from the models' configs on the Hub
    "Qwen/Qwen2-1.5B": 1.54, "google/gemma-2-2b": 2.61, "Qwen/Qwen2.5-3B": 3.09, "meta-llama/Llama-3.2-3B": 3.21,
    "nvidia/Llama-3.1-Minitron-4B-Width-Base": 4.51,
}  # fmt: skip
H100_BF16_DENSE = 989e12


def extrapolate(args: argparse.Namespace) -> None:
    """The full Zoo's cost from the measured tokens per response (see the module docstring)."""
    import pyarrow.parquet as pq

    from magpie_teach.chat import tokenize_conversation
    from magpie_teach.modeling import load_tokenizer
    from magpie_teach.tiny import build_tiny_suite

    work = Path(args.work)
    real = Path.home() / ".cache" / "magpie-teach" / "models" / "SmolLM2-135M-Instruct"
    tokenizer_path = str(real) if (real / "tokenizer.json").exists() else build_tiny_suite(work / "models").base_small
    tokenizer = load_tokenizer(tokenizer_path)
    folder = build_zoo(work / "zoo-2000", 2000)
    table = pq.read_table(next((folder / "data").glob("*.parquet"))).to_pandas().head(50)
    conversation = response = instruction = n = 0
    for _, row in table.iterrows():
        instruction += len(tokenizer(row["instruction"], add_special_tokens=False)["input_ids"]) + 1
        for teacher in ZOO_TEACHERS:
            example = tokenize_conversation(tokenizer, row["instruction"], row[teacher]["content"], 1_000_000)
            conversation += len(example.input_ids)
            response += int(example.loss_mask.sum()) + 1
            n += 1
    per_response = (conversation + response) / n + instruction / len(table) / len(ZOO_TEACHERS)
    total_tokens = 1_900_000 * per_response
    flops = sum(2 * p * 1e9 * total_tokens for p in PAPER_BASES.values())
    rate = H100_BF16_DENSE * args.mfu
    print(f"tokens per response: {conversation / n:.0f} (conversation) + {response / n:.0f} (response alone, L(y)) "
          f"+ {instruction / len(table) / len(ZOO_TEACHERS):.0f} (its share of L(x)) = {per_response:.0f}, "
          f"measured with {Path(tokenizer_path).name}'s tokenizer on {n} Zoo-layout responses")  # fmt: skip
    print(f"full Zoo under the paper's five base models ({sum(PAPER_BASES.values()):.1f}B parameters in all): "
          f"{total_tokens / 1e9:.2f}B tokens per model, {flops:.2e} FLOPs at 2 x parameters x tokens")  # fmt: skip
    print(
        f"at {args.mfu:.0%} of an H100's {H100_BF16_DENSE / 1e12:.0f} TFLOP/s (bf16 dense), "
        f"{args.efficiency:.0%} scaling efficiency beyond one GPU:"
    )
    print("| GPUs | hours | GPU-hours |\n| ---: | ---: | ---: |")
    for gpus in (1, 8, 64):
        efficiency = 1.0 if gpus == 1 else args.efficiency
        hours = flops / (rate * gpus * efficiency) / 3600
        print(f"| {gpus} | {hours:,.1f} | {hours * gpus:,.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["memory", "ray", "extrapolate", "select", "full"])
    parser.add_argument("--instructions", type=int, nargs="+", default=[2000, 40000, 100000])
    parser.add_argument("--sample", type=int, default=1000)
    parser.add_argument(
        "--rows", type=int, default=2400, help="responses ranked by `ray` (rounded to whole instructions)"
    )
    parser.add_argument("--workers", type=int, default=2, help="Ray actors of `ray` (and of `full --ray`)")
    parser.add_argument("--ray", action="store_true", help="`full` on a Ray head on 127.0.0.1 (the driver's peak)")
    parser.add_argument("--mfu", type=float, default=0.4, help="share of the GPU's peak the scoring reaches")
    parser.add_argument("--efficiency", type=float, default=0.9, help="scaling efficiency beyond one GPU")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "magpie-teach-bench-scale"))
    args = parser.parse_args()
    parts = {"memory": memory, "ray": ray, "extrapolate": extrapolate, "select": select_memory, "full": full}
    parts[args.part](args)


if __name__ == "__main__":
    main()
