"""The `magpie-teach` command line. Each subcommand builds one config dataclass and calls one library function."""

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from magpie_teach import __version__
from magpie_teach.errors import MagpieTeachError

DESCRIPTION = """\
Which teacher model should write the responses for my base model?

magpie-teach scores each candidate teacher's responses with a reward model and with each base model's
compatibility loss, and ranks the teachers by the Compatibility-Adjusted Reward,
CAR = reward / (1 + beta * compat_loss) (Xu et al., NAACL 2025), beside the paper's baselines.
"""

RANK_EPILOG = """\
outputs:
  OUTPUT/ranking.csv        one row per teacher x base model: n, car, reward, compat_loss, length,
                            ppl_self, ifd_self, ic_ifd_self (and *_ref), n_truncated, rank_<metric> (1 = best)
  OUTPUT/scores.parquet     per-example scores (reward, compat_loss, logprob_norm, ifd_self, ...)
  OUTPUT/correlations.csv   with --performance: Spearman rho of each metric vs AP per base model, and the mean
  OUTPUT/dropped.csv        with --drop-invalid: every dropped row and its reason
  OUTPUT/summary.json, OUTPUT/rank_config.yaml
example:
  magpie-teach rank --data responses.jsonl --base-model Qwen/Qwen2.5-3B --reward-model Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 --output runs/rank
"""


_ARGV: list[str] = []  # the command line being run, recorded in OUTPUT/command.json for dataset cards


def _finish(args: argparse.Namespace, output_dir: str | Path, kind: str | None = None) -> None:
    """After a command that produced OUTPUT: record its command line, and publish it with --push-to-hub."""
    from magpie_teach.artefacts import record_command

    record_command(output_dir, _ARGV)
    if getattr(args, "push_to_hub", None):
        from magpie_teach.hub.publish import PushConfig, push

        result = push(PushConfig(source=str(output_dir), repo_id=args.push_to_hub, tag=args.hub_tag, kind=kind,
                                 private=args.hub_private))  # fmt: skip
        _print_push(result)


def _print_push(result: Any) -> None:
    state = "already published, unchanged:" if result.unchanged else "published"
    print(f"{state} {result.kind}: {result.repo_id} tag {result.tag} commit {result.commit}")
    print(f"  load it: datasets.load_dataset({result.repo_id!r}, revision={result.tag!r})")


def _add_push_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("publishing (see `magpie-teach push --help`)")
    group.add_argument(
        "--push-to-hub", metavar="ORG/NAME", help="after writing OUTPUT, publish it to this Hub data set"
    )
    group.add_argument("--hub-tag", help="tag of the published version (default: the next minor version)")
    group.add_argument("--hub-private", action="store_true", help="create the Hub repo private")


def _print_ranking(ranking, correlations=None, confidence=None) -> None:  # noqa: ANN001 - pandas stays lazy
    import pandas as pd

    from magpie_teach.scoring.metrics import SHOWN_METRICS

    ranking = ranking.copy()
    if "car_ci_low" in ranking.columns:  # the interval beside the value it belongs to
        ranking.insert(ranking.columns.get_loc("car") + 1, "car_ci",
                       [f"[{low:.4g}, {high:.4g}]" for low, high in zip(ranking["car_ci_low"], ranking["car_ci_high"])])  # fmt: skip
    columns = [
        c
        for c in (
            "teacher",
            "n",
            "car",
            "car_ci",
            "p_best",
            *(m for m in SHOWN_METRICS if m != "car"),
            "n_truncated",
            "n_hit_max_new_tokens",
        )  # fmt: skip
        if c in ranking.columns
    ]
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        for base, group in ranking.groupby("base_model", sort=False):
            print(f"\nbase model: {base}  (ranked by CAR, beta={group['car_beta'].iloc[0]:g})")
            print(group.sort_values("rank_car")[columns].to_string(index=False))
        for sentence in (confidence or {}).get("sentences", []):
            print(sentence)
        if correlations is not None:
            print("\nSpearman rho of each metric with AP (higher is better):")
            print(correlations.to_string())


def run_rank(args: argparse.Namespace) -> int:
    from magpie_teach.ranking.rank import RankConfig, rank

    config = _config(args, RankConfig)
    if config.dry_run:
        return _print_plan(config)
    result = rank(config)
    _print_ranking(result.ranking, result.correlations, result.summary.get("confidence"))
    dropped = {k: v for k, v in result.counts.items() if k not in ("rows_in", "rows_kept")}
    print(
        f"\nrows in: {result.counts['rows_in']}, kept: {result.counts['rows_kept']}"
        + (f", {dropped}" if dropped else "")
    )
    print(f"wrote {result.output_dir}/ranking.csv and scores.parquet")
    _finish(args, result.output_dir)
    return 0


def _print_plan(config: Any) -> int:
    """``rank --dry-run``: what would load and what would be scored, after every check a run makes first."""
    from magpie_teach.ranking.rank import plan

    what = plan(config)
    counts = what["counts"]
    print(f"data {config.data}: {counts['rows_kept']} of {counts['rows_in']} responses kept, "
          f"{len(what['teachers'])} teacher(s)")  # fmt: skip
    loads = 0
    for model in what["models"]:
        left = sum(stage["to_score"] for stage in model["stages"])
        loads += left > 0
        note = "" if model["cached"] or not config.cache else " (no score-cache identity: nothing is kept)"
        print(f"{model['model']}: from {model['source']}{note}; " + ("loads" if left else "does not load"))
        for stage in model["stages"]:
            print(f"  {stage['stage']}: {stage['examples']} examples, {stage['in_cache']} in the score cache, "
                  f"{stage['to_score']} to score")  # fmt: skip
    total = sum(stage["to_score"] for model in what["models"] for stage in model["stages"])
    print(f"dry run: {total} example(s) to score by {loads} model(s); nothing was loaded but tokenizers, nothing "
          f"written (the run writes {config.output_dir})")  # fmt: skip
    return 0


def run_paradox(args: argparse.Namespace) -> int:
    import pandas as pd

    from magpie_teach.ranking.paradox import ParadoxConfig, paradox

    config = _config(args, ParadoxConfig)
    pairs = paradox(config)
    with pd.option_context("display.width", 160, "display.max_rows", 500, "display.float_format", "{:.3f}".format):
        for base, group in pairs.groupby("base_model", sort=False):
            print(f"\nbase model: {base}: {len(group)} pair(s) where the larger teacher is the worse teacher")
            print(group.drop(columns=["base_model"]).to_string(index=False))
    print(f"\n{len(pairs)} paradox pair(s) over {pairs['base_model'].nunique()} base model(s)")
    if config.output:
        print(f"wrote {config.output}")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from magpie_teach.ranking.calibrate import CalibrateConfig, calibrate
    from magpie_teach.scoring.calibrate import choice_sentence, stable_range_text

    config = _config(args, CalibrateConfig)
    result = calibrate(config)
    means, held = result["mean_rho"], result["held_out_mean_rho"]
    best = result["best_metric"] + (f" (beta {result['best_beta']:.4g})" if result["best_metric"] == "car" else "")
    stable = stable_range_text(result)
    print(
        f"best predictor of AP over {len(result['base_models'])} base model(s): {best}, mean rho {means['best']:.3f}"
    )
    print(f"  CAR: beta {result['best_beta']:.4g} (every beta in {stable} orders the teachers the same: a range "
          f"where the fit is stable, not a confidence interval); mean rho {means['car_best_beta']:.3f} against "
          f"{means['default']:.3f} at the default beta {result['default_beta']:g}")  # fmt: skip
    print(f"  {choice_sentence(result)}")
    if held["fitted"] is not None:
        print(f"  held out (fitted on the other base models): mean rho {held['fitted']:.3f} for the fitted choice, "
              f"{held['default']:.3f} for the default")  # fmt: skip
    print(f"wrote {config.output_dir}/calibration.json (rank --beta-from reads it), correlations.csv, "
          "beta_curve.csv, calibration.png")  # fmt: skip
    return 0


def run_route(args: argparse.Namespace) -> int:
    from magpie_teach.ranking.route import RouteConfig, describe, route

    config = _config(args, RouteConfig)
    summary = route(config)
    for line in describe(summary):
        print(line)
    print(f"wrote {config.output_dir}/router.parquet, route_summary.json (generate's routing: block and select "
          "--strategy routed read the folder)")  # fmt: skip
    _finish(args, config.output_dir, "router")
    return 0


def run_select(args: argparse.Namespace) -> int:
    from magpie_teach.selection.select import SelectConfig, select

    result = select(_config(args, SelectConfig))
    summary = result.summary
    print(f"selected {summary['rows_out']} rows ({summary['strategy']}) for base model {summary['base_model']}")
    if summary["strategy"] == "teacher":
        car = summary["car"]
        print(f"  CAR with beta={car['beta']:g}, reward shift {car['reward_shift']} ({car['source']})")
    for teacher, count in summary["rows_per_teacher"].items():
        print(f"  {teacher}: {count}")
    if summary["dropped_by_reason"]:
        print(f"dropped by filters: {summary['dropped_by_reason']}")
    print(f"wrote {result.output_dir} (load with datasets.load_dataset({str(result.output_dir)!r}))")
    _finish(args, result.output_dir)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from magpie_teach.training.sft import parse_recipe, train

    result = train(*parse_recipe(args.recipe, args.overrides))
    print(result.sentence())
    print(f"saved {result.output_dir} (data revision {result.dataset_revision})")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    import pandas as pd

    from magpie_teach.evaluation.validate import ValidateConfig, validate

    result = validate(_config(args, ValidateConfig))
    with pd.option_context("display.width", 160, "display.float_format", "{:.4g}".format):
        print(result.students.drop(columns=["student"], errors="ignore").to_string(index=False))
        print("\nSpearman rho of each metric with the students' scores:")
        print(result.correlations.to_string())
    print(f"wrote {result.output_dir}/correlations.csv")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    import pandas as pd

    from magpie_teach.evaluation.evaluate import EvaluateConfig, evaluate
    from magpie_teach.scoring.winrates import verdict_sentence

    config = _config(args, EvaluateConfig)
    result = evaluate(config)
    rates = result.win_rates
    table = rates[["student"]].copy()
    for name in ("win_rate", "lc_win_rate", "bt_score"):
        if f"{name}_low" in rates.columns:  # each rate with its interval: one number alone reads surer than it is
            table[name] = [f"{v:.1f} [{lo:.1f}, {hi:.1f}]" for v, lo, hi in
                           zip(rates[name], rates[f"{name}_low"], rates[f"{name}_high"])]  # fmt: skip
        else:
            table[name] = rates[name].map("{:.1f}".format)
    table[["n", "n_unparseable"]] = rates[["n", "n_unparseable"]]
    with pd.option_context("display.width", 200):
        print(table.to_string(index=False))
    if "win_rate_low" in rates.columns:
        for row in rates.itertuples():
            if row.n:
                print(verdict_sentence(row.student, result.baseline, row.win_rate, row.win_rate_low,
                                       row.win_rate_high, config.confidence))  # fmt: skip
    if result.first_position == result.first_position:
        print(f"judge: prefers the answer shown first {100 * result.first_position:.0f}% of the time (50%: no "
              "position bias; both orders are asked, which cancels it)")  # fmt: skip
    print(f"judge: {result.judge_forward_passes} forward pass(es) in this run (the rest from the cache)")
    print(
        f"wrote {result.output_dir}/judgements.parquet, win_rates.csv and performance.csv (rank --performance reads it)"
    )
    _finish(args, result.output_dir, "evaluation")
    return 0


def run_review_push(args: argparse.Namespace) -> int:
    from magpie_teach.review.argilla_io import ReviewPushConfig, push_for_review

    summary = push_for_review(_config(args, ReviewPushConfig))
    print(
        f"sent {summary['records']} records to Argilla dataset {summary['dataset']!r} ({summary['flagged']} flagged)"
    )
    for teacher, count in summary["per_teacher"].items():
        print(f"  {teacher}: {count}")
    return 0


def run_review_pull(args: argparse.Namespace) -> int:
    import pandas as pd

    from magpie_teach.review.argilla_io import ReviewPullConfig, pull_reviews

    config = _config(args, ReviewPullConfig)
    reviews, table, agreement = pull_reviews(config)
    print(f"{len(reviews)} submitted annotation(s) from {agreement['annotators']} annotator(s)")
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    if agreement["pairs"]:
        print(
            f"annotator agreement: exact {agreement['exact_agreement']:.2f}, mean pairwise rho {agreement['mean_pairwise_rho']}"
        )
    print(f"wrote {config.output_dir}/reviews.parquet and review_summary.csv")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from magpie_teach.generation.config import load_generate_config
    from magpie_teach.generation.run import generate

    config = load_generate_config(args.config_file)
    summary = generate(config, dry_run=True)  # the plan is printed before any progress line
    counts = summary["counts"]
    print(f"instructions: {counts['instructions_used']} used of {counts['instructions_in']} ({counts})")
    for name, todo in summary["remaining"].items():
        print(f"  {name}: {todo} instruction(s) to generate")
    if config.scoring is not None:
        print(f"  then scoring: reward {config.scoring.reward_model}, base models {config.scoring.base_models}")
    sys.stdout.flush()
    if not args.dry_run:
        summary = generate(config)
    if args.dry_run:
        teachers = {t.name: t for t in config.teachers}
        left = {name: n * teachers[name].num_generations for name, n in summary["remaining"].items()}
        tokens = sum(n * teachers[name].sampling.max_new_tokens for name, n in left.items())
        print(f"to generate: {sum(left.values()):,} generations, at most {tokens:,} generated tokens (max_new_tokens)")
        if config.probe is not None:
            print("with a probe: block, `magpie-teach probe CONFIG --dry-run` shows what its first rounds cost")
        print("dry run: the config is valid; nothing was generated")
        return 0
    for name, teacher in summary["teachers"].items():
        print(f"  {name}: {teacher}")
    print(f"wrote {config.output_dir}/responses.parquet")
    if "scoring" in summary:
        from magpie_teach.artefacts import read_rank_folder

        rank_dir = summary["scoring"]["output"]
        ranking, _, rank_summary = read_rank_folder(rank_dir)
        _print_ranking(ranking, None, rank_summary.get("confidence"))
        print(f"wrote {rank_dir}/ (ranking.csv, scores.parquet: read by report, select and push like a rank output)")
    _finish(args, config.output_dir)
    return 0


def run_probe(args: argparse.Namespace) -> int:
    import dataclasses

    from magpie_teach.config import build_config, flag_name
    from magpie_teach.errors import ConfigError
    from magpie_teach.generation.config import ReplayConfig
    from magpie_teach.generation.probing import describe, probe_generate, probe_replay
    from magpie_teach.settings import ProbeSettings

    if args.config_file and args.replay:
        raise ConfigError("give a generate YAML with a probe: block, or --replay DATA, not both")
    if args.config_file:
        from magpie_teach.generation.config import load_generate_config

        probe_fields = {f.name for f in dataclasses.fields(ProbeSettings)}
        extra = [flag_name(f) for f in dataclasses.fields(ReplayConfig)
                 if f.name not in probe_fields and getattr(args, f.name) not in (None, [])]  # fmt: skip
        if extra:
            raise ConfigError(
                f"{', '.join(extra)}: with a YAML config, models and data come "
                "from its scoring: and instructions: blocks (the flags of the probe: block may override it)"
            )
        overrides = {name: getattr(args, name) for name in probe_fields if getattr(args, name) is not None}
        config = load_generate_config(args.config_file)
        summary = probe_generate(config, overrides, dry_run=args.dry_run)
        output = config.output_dir
    else:
        config = build_config(ReplayConfig, {f.name: getattr(args, f.name) for f in dataclasses.fields(ReplayConfig)})
        summary = probe_replay(config, dry_run=args.dry_run)
        output = config.output_dir
    if args.dry_run:
        print("\n".join(summary["plan"]))
        print("dry run: the config is valid; nothing was generated")
        return 0
    print("\n".join(describe(summary)))
    print(f"wrote {output}/probe_summary.json, probe_rounds.csv and {output}/rank/ (read by report, select and push)")
    return 0


def run_push(args: argparse.Namespace) -> int:
    from magpie_teach.hub.publish import PushConfig, push

    _print_push(push(_config(args, PushConfig)))
    return 0


def run_hub_serve(args: argparse.Namespace) -> int:
    from magpie_teach.hub.server import serve
    from magpie_teach.hub.target import hub_root

    serve(
        args.root or str(hub_root()),
        host=args.host,
        port=args.port,
        verbose=not args.quiet,
        ready_file=args.ready_file,
        require_token=args.require_token,
    )
    return 0


def run_report(args: argparse.Namespace) -> int:
    from magpie_teach.report import ReportConfig, report

    result = report(_config(args, ReportConfig))
    print(f"sections: {', '.join(result.sections)}")
    print(
        f"wrote {result.markdown} and {result.html} (self-contained), figures in {result.markdown.parent / 'figures'}"
    )
    return 0


def run_tiny(args: argparse.Namespace) -> int:
    from magpie_teach.tiny import build_tiny_suite

    suite = build_tiny_suite(args.output, seed=args.seed)
    for name, path in vars(suite).items():
        print(f"{name:12s} {path}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from magpie_teach.demo.run import DemoConfig, demo

    summary = demo(_config(args, DemoConfig))
    print(f"\ndone in {summary['minutes']} min ({summary['models']} models). Where everything is:")
    for what, where in summary["outputs"].items():
        print(f"  {what:27s} {where}")
    print(f"  {'review':27s} {summary['review']}")
    if summary["note"]:
        print(f"note: {summary['note']}")
    return 0


def _config(args: argparse.Namespace, cls: type) -> Any:
    """The command's config dataclass: its YAML file (--config) overridden by the flags given."""
    import dataclasses

    from magpie_teach.config import build_config

    return build_config(cls, {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}, args.config)


def _config_command(sub: Any, name: str, cls: type, func: Callable, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose options are the fields of ``cls``, plus --config for a YAML file of them."""
    from magpie_teach.config import add_dataclass_arguments

    parser = sub.add_parser(name, **kwargs)
    parser.add_argument("--config", help="YAML file with the options below (flags override it)")
    add_dataclass_arguments(parser, cls)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from magpie_teach.ranking.rank import RankConfig

    parser = argparse.ArgumentParser(
        prog="magpie-teach", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"magpie-teach {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.set_defaults(_commands=sub.choices)  # for the did-you-mean of a misspelt flag (see `_parse`)

    rank_parser = _config_command(
        sub,
        "rank",
        RankConfig,
        run_rank,
        help="rank teachers per base model by CAR and the paper's baselines",
        description="Rank teachers per base model by CAR, with reward, compatibility loss, length, perplexity and IFD beside it.",
        epilog=RANK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_push_flags(rank_parser)

    from magpie_teach.ranking.paradox import ParadoxConfig

    _config_command(
        sub,
        "paradox",
        ParadoxConfig,
        run_paradox,
        help="within-family pairs where the larger teacher is the worse teacher",
        description="The Larger Models' Paradox report: for each base model, every pair of same-family teachers where the larger one gives the lower AP.",
    )

    from magpie_teach.ranking.calibrate import CalibrateConfig

    _config_command(
        sub,
        "calibrate",
        CalibrateConfig,
        run_calibrate,
        help="which metric and which CAR beta predict your students' performance",
        description="Spearman rho of every metric with AP per base model and on average; CAR's beta fitted exactly "
        "(every crossing point, where two teachers swap places), reward models and shifts compared, and the gain "
        "measured leaving one base model out. Writes calibration.json, which `rank --beta-from` reads.",
        epilog="example:\n  magpie-teach calibrate --scores runs/rank --performance students.csv --output runs/calibration",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    from magpie_teach.ranking.route import RouteConfig

    route_parser = _config_command(
        sub,
        "route",
        RouteConfig,
        run_route,
        help="learn which teacher to send each instruction to (per base model), or replay what it would give",
        description="A per-instruction teacher router: from instructions every teacher answered and that were "
        "scored, one ridge head per teacher on the base model's own features of the instruction predicts the "
        "per-example CAR (reward / (1 + beta * compat_loss)); routing is used only when, cross-fitted on those "
        "instructions, it beats the single best teacher beyond its interval, else every instruction goes to that "
        "teacher. --scores learns a router from a rank (or probe) folder; --replay measures on data where every "
        "teacher answered every instruction what routing would have given (single, routed, oracle, spend).",
        epilog="outputs:\n  OUTPUT/router.parquet        the head per base model and teacher (generate's routing: "
        "block and select --strategy routed read the folder)\n  OUTPUT/route_summary.json    per base model: "
        "single_teacher, routed, decision, gain and its interval; with --replay score_single, score_routed, "
        "score_oracle, spend\n  OUTPUT/route_targets.parquet the targets it learnt from\nexamples:\n"
        "  magpie-teach route --scores runs/probe/rank --output runs/router\n"
        "  magpie-teach route --replay zoo.parquet --reward-column reward --base-model Qwen/Qwen2.5-3B "
        "--seed-instructions 200 --output runs/route-replay",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_push_flags(route_parser)

    from magpie_teach.evaluation.validate import ValidateConfig
    from magpie_teach.selection.select import SelectConfig

    select_parser = _config_command(
        sub,
        "select",
        SelectConfig,
        run_select,
        help="build an SFT data set (messages) from scores",
        description="Build an SFT data set with a `messages` column from `rank` scores: a whole teacher (best by CAR or any metric), or per instruction best-of-N by reward, GRAPE, or a reward-compatibility mix. Filters drop (and count) failed, truncated, low-reward or long responses.",
    )
    _add_push_flags(select_parser)

    p = sub.add_parser(
        "train",
        help="SFT with TRL from a recipe",
        description="Fine-tune with TRL's SFTTrainer from a YAML recipe (keys of DataArguments, TRL's SFTConfig and ModelConfig); `--key value` flags after the recipe override it. Runs unchanged under `accelerate launch -m magpie_teach.cli train ...`; resumes from the last checkpoint in output_dir.",
        epilog="example:\n  magpie-teach train recipes/Qwen2.5-3B/sft/config_magpie.yaml --dataset_name runs/sft-data --output_dir runs/student",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny/sft/config_cpu.yaml")
    p.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="--key value pairs overriding the recipe (e.g. --max_steps 20 --output_dir runs/x)",
    )
    p.set_defaults(func=run_train)

    from magpie_teach.evaluation.evaluate import EvaluateConfig

    evaluate_parser = _config_command(
        sub,
        "evaluate",
        EvaluateConfig,
        run_evaluate,
        help="win rates of students against a baseline, judged by an LLM or a reward model",
        description="Students (and the baseline) answer a prompt set greedily with their chat templates (transformers, "
        "vllm or an OpenAI-compatible server); a judge LLM compares each answer with the baseline's in both orders "
        "(verdict from its log-probabilities), or a reward model does. Writes judgements.parquet, win_rates.csv "
        "(win rate, AlpacaEval-2-style length-controlled win rate, Bradley-Terry score, bootstrap intervals) and "
        "performance.csv, which rank/validate/calibrate --performance read. Verdicts are cached: adding a student "
        "judges only its answers, and a killed run resumes.",
        epilog="example:\n  magpie-teach evaluate --students-from runs/validate --baseline Qwen/Qwen2.5-0.5B-Instruct "
        "--judge Qwen/Qwen2.5-7B-Instruct --output runs/evaluate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_push_flags(evaluate_parser)

    _config_command(
        sub,
        "validate",
        ValidateConfig,
        run_validate,
        help="check CAR against real fine-tunes on your setup",
        description="Fine-tune one student per teacher with a small budget, score the students on held-out instructions (reward model by default, or imported benchmark results), and report Spearman rho of each metric's ranking against the students' ranking.",
    )

    from magpie_teach.review.argilla_io import ReviewPullConfig, ReviewPushConfig

    review = sub.add_parser(
        "review",
        help="human spot-checks in Argilla (push a sample, pull annotations)",
        description="Send a stratified sample of scored responses to an Argilla 2.x server for rating, and bring the annotations back with a summary of how reward and CAR agree with people. The server comes from ARGILLA_API_URL and ARGILLA_API_KEY.",
    )
    review_sub = review.add_subparsers(dest="review_command", metavar="{push,pull}", required=True)
    review.set_defaults(_subcommand="review_command", _subcommands=review_sub.choices)
    _config_command(
        review_sub,
        "push",
        ReviewPushConfig,
        run_review_push,
        help="send a stratified sample per teacher, plus every flagged row",
        description="Sample per teacher across reward / CAR quantile bands (seeded), add every truncated, failed or reward-vs-compatibility-disagreeing row, and log them to an Argilla dataset with rating, problem-label and comment questions and filterable metadata. Stable record ids: pushing again updates, never duplicates.",
    )
    _config_command(
        review_sub,
        "pull",
        ReviewPullConfig,
        run_review_pull,
        help="bring submitted annotations back with a summary",
        description="Fetch submitted responses, join them to the scored rows, and report per-teacher mean rating, Spearman rho of ratings with reward and with CAR, and annotator agreement.",
    )

    p = sub.add_parser(
        "generate",
        help="responses from several teachers with distilabel (resumable)",
        description="Answer instructions with every teacher of a YAML config (backends: transformers, vllm, or any OpenAI-compatible server), storing each finished batch so that a killed run resumes where it stopped. --dry-run validates the config and prints the plan.",
    )
    p.add_argument("config_file", metavar="CONFIG", help="generation YAML (see pipelines/configs/)")
    p.add_argument(
        "--dry-run", action="store_true", help="validate the config and show the work left; generate nothing"
    )
    p.set_defaults(func=run_generate)

    _add_push_flags(p)

    from magpie_teach.config import add_dataclass_arguments
    from magpie_teach.generation.config import ReplayConfig

    p = sub.add_parser(
        "probe",
        help="a budgeted teacher search: stop generating for teachers that have lost",
        description=(
            "Generate and score in rounds of growing size (start, x growth, up to max_instructions), only for the "
            "teachers still in the race, and stop when each base model has one teacher left, when the survivors are "
            "within epsilon of each other, or when the budget is spent. A teacher is eliminated for a base model when "
            "its leader is better at the chosen confidence, corrected (Bonferroni) for every comparison in every "
            "round. CONFIG is a generate YAML with scoring: and probe: blocks; --replay DATA replays responses "
            "already generated to measure what a probe would have spent."
        ),
        epilog=(
            "examples:\n  magpie-teach probe pipelines/configs/tiny_cpu_probe.yaml --dry-run\n"
            "  magpie-teach probe --replay zoo.parquet --reward-column ArmoRM-Llama3-8B-v0.1 "
            "--base-model Qwen/Qwen2-1.5B --output runs/probe"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config_file", metavar="CONFIG", nargs="?", help="generate YAML with scoring: and probe: blocks")
    p.add_argument("--dry-run", action="store_true", help="print the budget of the full grid and the first rounds")
    add_dataclass_arguments(p, ReplayConfig)
    p.set_defaults(func=run_probe)

    from magpie_teach.hub.publish import PushConfig

    _config_command(
        sub,
        "push",
        PushConfig,
        run_push,
        help="publish an output folder as a versioned Hub data set (one commit + a tag)",
        description=(
            "Publish the output folder of generate, rank or select as a Hub data set: the data, a dataset card and "
            "the resolved config in one commit, then a tag (default: the next minor version). An existing tag is "
            "refused unless --overwrite. Target: $HF_ENDPOINT if set, else huggingface.co when a token is found "
            "(HF_TOKEN or `hf auth login`), else the local hub (see `magpie-teach hub serve`)."
        ),
        epilog="example:\n  magpie-teach push runs/rank --repo-id my-org/teacher-ranking --tag v1.0.0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    from magpie_teach.report import ReportConfig

    _config_command(
        sub,
        "report",
        ReportConfig,
        run_report,
        help="render a ranking (and/or a performance table) as Markdown + PNG and self-contained HTML",
        description=(
            "Render the report of a `rank` output: the teacher ranking per base model by CAR with the baselines, "
            "reward against compatibility loss with CAR iso-lines, and, with --performance, the Spearman rho of each "
            "metric against performance, the best teacher per base model and the Larger Models' Paradox pairs. "
            "--performance alone renders the last two from a performance table such as the paper's Table 6."
        ),
        epilog=(
            "examples:\n  magpie-teach report runs/rank --output runs/report\n"
            "  magpie-teach report --performance src/magpie_teach/resources/paper_table6_performance.csv --output runs/paper"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    hub = sub.add_parser("hub", help="the local Hub-compatible server", description="The local Hub-compatible server.")
    hub_sub = hub.add_subparsers(dest="hub_command", metavar="HUB_COMMAND", required=True)
    hub.set_defaults(_subcommand="hub_command", _subcommands=hub_sub.choices)
    p = hub_sub.add_parser(
        "serve",
        help="serve the local hub on 127.0.0.1",
        description=(
            "Serve the local hub (bare git repos + LFS store) that `push` writes to when there is no token. "
            "Point huggingface_hub and datasets at it with HF_ENDPOINT=<printed URL> and HF_HUB_DISABLE_XET=1."
        ),
    )
    p.add_argument("--root", help="storage folder (default: $MAGPIE_TEACH_HUB_ROOT or ~/.cache/magpie-teach/hub)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    p.add_argument("--quiet", action="store_true", help="do not log requests")
    p.add_argument(
        "--require-token",
        action="store_true",
        help="take writes only with the root's token (ROOT/.hub-secret, mode 0600; `push` to this root sends it): "
        "other local users and programs can then read but not write",
    )
    p.add_argument(
        "--ready-file", help="write the base URL to this file once listening (for scripts; use with --port 0)"
    )
    p.set_defaults(func=run_hub_serve)

    p = sub.add_parser(
        "tiny",
        help="build the tiny offline models used by tests and the demo",
        description="Build tiny, randomly initialised models (tokenizer, Llama LMs, GPT-2 reference, reward model) offline and deterministically.",
    )
    p.add_argument("--output", required=True, help="folder to save the models in")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default: 0)")
    p.set_defaults(func=run_tiny)

    from magpie_teach.demo.run import DemoConfig

    _config_command(
        sub,
        "demo",
        DemoConfig,
        run_demo,
        help="the whole loop offline: instructions, teachers, CAR ranking, report, SFT data, publish, fine-tune",
        description=(
            "Run the whole loop on embedded defaults, offline, on CPU: Magpie instructions and responses from "
            "several teachers (distilabel), reward + compatibility + CAR per base model, a report, SFT data from the "
            "best teacher, publishing with dataset cards to a local Hub-compatible server, a short fine-tune of the "
            "student, and a review batch when ARGILLA_API_URL is set. Each stage is the real command, printed as it "
            "runs; rerunning resumes."
        ),
    )
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parse_args``, except that an unknown flag is reported by the subcommand it was given to, with its usage
    and the closest flag it has (argparse reports it from the top-level parser, with the top-level usage)."""
    import difflib

    args, unknown = parser.parse_known_args(argv)
    if not unknown:
        return args
    target = parser
    if getattr(args, "command", None) in getattr(args, "_commands", {}):
        target = args._commands[args.command]
        if getattr(args, "_subcommands", None) and getattr(args, args._subcommand, None) in args._subcommands:
            target = args._subcommands[getattr(args, args._subcommand)]
    flags = [flag for flag in target._option_string_actions if flag.startswith("--")]
    hints = []
    for word in unknown:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=")[0], flags, n=1)
            hints.append(f"{word}" + (f" (did you mean {close[0]}?)" if close else ""))
        else:
            hints.append(word)
    target.error(f"unrecognized arguments: {' '.join(hints)}")
    return args  # not reached: error() exits


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    _ARGV[:] = argv
    if args.command == "push" or getattr(args, "push_to_hub", None):
        from magpie_teach.hub.target import choose_target

        if args.command == "push":  # the arguments' errors come before the notice of where the push goes
            from magpie_teach.hub.publish import PushConfig

            try:
                _config(args, PushConfig)
            except MagpieTeachError as err:
                print(f"magpie-teach push: error: {err}", file=sys.stderr)
                return 2
        choose_target()  # before huggingface_hub is imported: it reads HF_ENDPOINT once
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.captureWarnings(True)  # the library's warnings.warn calls show as one log line each
    # distilabel 1.5.3 (its last release) declares a field that pydantic warns about whenever distilabel is imported:
    # nothing a user can act on
    warnings.filterwarnings("ignore", message=r"The 'default' attribute with value None was provided to the `Field",
                            category=UserWarning)  # fmt: skip
    # distilabel logs several lines per batch at INFO, rendered in the main process while the steps compute:
    # the same policy as ours (warnings, INFO with -v) unless the environment says otherwise
    os.environ.setdefault("DISTILABEL_LOG_LEVEL", "INFO" if args.verbose else "WARNING")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except MagpieTeachError as err:
        print(f"magpie-teach {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
