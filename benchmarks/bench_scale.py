"""Benchmark of `rank` at the Generator-Zoo's scale (not a test): peak memory against the size of the data.

    python benchmarks/bench_scale.py [--instructions 2000 20000 100000] [--sample 1000] [--work DIR]

Builds folders in the exact layout of ``Magpie-Align/Magpie-100K-Generator-Zoo`` (ten parquet shards
``data/train-0000K-of-00010.parquet``; one row per instruction with ``uuid``, ``instruction`` and one struct
column per teacher, named as the Zoo's 19 teachers, holding ``content`` and the three reward fields), with
responses of 50 to 500 words (log-uniform; about 2.4 GB of parquet for 100K instructions, as the real Zoo), once
per size under ``--work`` (reused by later runs). Then runs ``magpie-teach rank --reward-column
ArmoRM-Llama3-8B-v0.1 --sample N --max-length 256`` under a tiny base model on each (the short
``--max-length`` keeps the scoring, which is the same at every size, from taking most of the time), each in a fresh process, and prints its
peak resident memory (VmHWM), wall time, and the ratio of each peak to the smallest size's, measured in the
same run. The goal (issue 13): at the same ``--sample``, memory does not grow with the data (a 40K file within
1.3x of a 2K one) and the full 1.9M-response Zoo ranks within 2 GB.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ZOO_TEACHERS = [
    "Qwen2-1.5B-Instruct", "Qwen2-7B-Instruct", "Qwen2-72B-Instruct",
    "Qwen2.5-3B-Instruct", "Qwen2.5-7B-Instruct", "Qwen2.5-14B-Instruct", "Qwen2.5-32B-Instruct", "Qwen2.5-72B-Instruct",
    "Meta-Llama-3-8B-Instruct", "Meta-Llama-3-70B-Instruct",
    "Meta-Llama-3.1-8B-Instruct", "Meta-Llama-3.1-70B-Instruct", "Meta-Llama-3.1-405B-Instruct",
    "gemma-2-2b-it", "gemma-2-9b-it", "gemma-2-27b-it",
    "Phi-3-mini-128k-instruct", "Phi-3-small-128k-instruct", "Phi-3-medium-128k-instruct",
]  # fmt: skip
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
            "--sample", str(sample), "--output", str(out), "--no-cache", "--max-length", "256"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUN, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"rank failed on {data}:\n{done.stderr[-3000:]}")
    kb = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_KB"))
    return kb / 1024, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instructions", type=int, nargs="+", default=[2000, 20000, 100000])
    parser.add_argument("--sample", type=int, default=1000)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "magpie-teach-bench-scale"))
    args = parser.parse_args()

    from magpie_teach.tiny import build_tiny_suite

    work = Path(args.work)
    base = build_tiny_suite(work / "models").base_small
    print(f"rank --reward-column {REWARDS[0]} --sample {args.sample} --max-length 256, tiny base model; Zoo layout, "
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


if __name__ == "__main__":
    main()
