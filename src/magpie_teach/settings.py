"""Settings shared by several verbs: one declaration, one default and one check each.

Configs inherit them (as TRL's ``SFTConfig(_BaseConfig)`` does):

* :class:`CARSettings` (``beta``, ``reward_shift``): the verbs that compute CAR from scratch, ``rank``
  and ``generate``'s ``scoring:`` block;
* :class:`RecordedCARSettings`: the verbs downstream of ``rank`` (``select``, ``review push``,
  ``validate``). Left unset, they use the values ``rank`` recorded beside the scores (its
  ``rank_config.yaml``), so they rank teachers exactly as ``rank`` did; :meth:`RecordedCARSettings.car`
  says which values were used and where they came from;
* :class:`ModelRunSettings` (``max_length``, ``batch_tokens``, ``dtype``, ``device``): every run of a model
  over rows, with the scoring engine's defaults;
* :class:`ConfidenceSettings` (``bootstrap``, ``confidence``, ``bootstrap_seed``): the verbs that rank teachers
  from scores (``rank``, ``generate``'s ``scoring:`` block), for the intervals of
  :mod:`magpie_teach.scoring.confidence`;
* :class:`JudgeSettings`: the judge and the baseline of ``evaluate`` and ``validate --judge``;
* :class:`ProbeSettings`: the ``probe:`` block of a `generate` YAML and `probe --replay`'s flags (the rounds of
  :mod:`magpie_teach.scoring.probe`).
* :class:`ReplaySettings`: the responses `probe --replay` and `route --replay` replay (where, which revision,
  split and teachers, and whether invalid instructions are dropped).

Standard library only: ``magpie-teach --help`` imports these.
"""

from dataclasses import dataclass, field
from typing import Any

from magpie_teach.errors import ConfigError

DEFAULT_BETA = 3.0
DEFAULT_REWARD_SHIFT = "none"
DEFAULT_MAX_LENGTH = 4096
DEFAULT_BATCH_TOKENS = 8192
DTYPES = ("float32", "bfloat16", "float16", "auto")
DEFAULT_BOOTSTRAP = 1000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_BOOTSTRAP_SEED = 0

_BETA_HELP = "CAR = reward / (1 + beta * compat_loss)."
_SHIFT_HELP = "Affine shift of rewards before CAR: 'none' (warn on non-positive mean rewards), 'auto', or a number."


def check_car(beta: float, reward_shift: str | float, where: str = "--") -> None:
    """ConfigError unless beta >= 0 and reward_shift is 'none', 'auto' or a number; WHERE prefixes the key."""
    if beta < 0:
        raise ConfigError(f"{_key(where, 'beta')} must be >= 0, got {beta}")
    if str(reward_shift) not in ("none", "auto"):
        try:
            float(reward_shift)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{_key(where, 'reward_shift')} {reward_shift!r}: expected 'none', 'auto' or a number"
            ) from None


@dataclass(kw_only=True)
class CARSettings:
    """CAR (Compatibility-Adjusted Reward) settings."""

    beta: float = field(default=DEFAULT_BETA, metadata={"help": _BETA_HELP})
    reward_shift: str = field(default=DEFAULT_REWARD_SHIFT, metadata={"help": _SHIFT_HELP})
    beta_from: str | None = field(
        default=None,
        metadata={
            "help": "calibration.json written by `magpie-teach calibrate`: beta is its best_beta (recorded as "
            "beta in the outputs, beside this path); overrides --beta."
        },
    )

    def check_car(self, where: str = "--") -> None:
        if self.beta_from:
            self.beta = read_beta(self.beta_from, _key(where, "beta_from"))
        check_car(self.beta, self.reward_shift, where)


def read_beta(path: str, flag: str = "--beta-from") -> float:
    """``best_beta`` of a calibration.json written by `magpie-teach calibrate` (FLAG names it in errors)."""
    import json
    import math
    from pathlib import Path

    try:
        value = json.loads(Path(path).read_text())["best_beta"]
    except OSError as err:
        raise ConfigError(f"{flag} {path}: {err.strerror or err}") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{flag} {path}: not a calibration.json of `magpie-teach calibrate` (no best_beta)"
        ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{flag} {path}: best_beta {value!r} is not a beta (a number >= 0)")
    return float(value)


@dataclass
class CARChoice:
    """The CAR settings a downstream verb used, and where they came from."""

    beta: float
    reward_shift: str
    source: str  # "command line", the rank_config.yaml read, or "default (no rank_config.yaml)"

    def describe(self) -> str:
        return f"CAR with beta={self.beta:g}, reward shift {self.reward_shift} ({self.source})"


@dataclass(kw_only=True)
class RecordedCARSettings:
    """CAR settings (default: those `rank` recorded with the scores)."""

    beta: float | None = field(
        default=None,
        metadata={
            "help": f"{_BETA_HELP} Default: the beta `rank` recorded with the scores ({DEFAULT_BETA:g} if none)."
        },
    )
    reward_shift: str | None = field(
        default=None,
        metadata={"help": "CAR's reward shift: none, auto or a number. Default: the one `rank` recorded."},
    )

    def check_car(self, where: str = "--") -> None:
        check_car(
            DEFAULT_BETA if self.beta is None else self.beta,
            DEFAULT_REWARD_SHIFT if self.reward_shift is None else self.reward_shift,
            where,
        )

    def car(self, recorded: dict[str, Any] | None, recorded_from: str = "rank_config.yaml") -> CARChoice:
        """This run's CAR settings: each value given here, else the one RECORDED by `rank`, else the default."""
        recorded = recorded or {}
        given = [name for name in ("beta", "reward_shift") if getattr(self, name) is not None]
        beta = self.beta if self.beta is not None else float(recorded.get("beta", DEFAULT_BETA))
        shift = self.reward_shift if self.reward_shift is not None else str(recorded.get("reward_shift", "none"))
        if len(given) == 2:
            source = "command line"
        elif recorded:
            source = f"recorded by rank in {recorded_from}" + (
                f"; {', '.join(given)} from the command line" if given else ""
            )
        else:
            source = "defaults: no rank_config.yaml beside the scores" + (
                f"; {', '.join(given)} from the command line" if given else ""
            )
        return CARChoice(beta, shift, source)


@dataclass(kw_only=True)
class ModelRunSettings:
    """Model-run settings (the scoring engine's defaults)."""

    max_length: int = field(
        default=DEFAULT_MAX_LENGTH,
        metadata={"help": "Conversations longer than this many tokens are cut (counted in n_truncated)."},
    )
    batch_tokens: int = field(default=DEFAULT_BATCH_TOKENS, metadata={"help": "Padded tokens per forward pass."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Model dtype; auto is bfloat16 on a GPU, float32 on the CPU.", "choices": list(DTYPES)},
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto."})

    def check_run(self, where: str = "--") -> None:
        if self.max_length < 2:
            raise ConfigError(f"{_key(where, 'max_length')} must be >= 2, got {self.max_length}")
        if self.batch_tokens < 1:
            raise ConfigError(f"{_key(where, 'batch_tokens')} must be >= 1, got {self.batch_tokens}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"{_key(where, 'dtype')} {self.dtype!r} is not one of {', '.join(DTYPES)}")


DEFAULT_PERFORMANCE_COLUMNS = ("AE2_LC_WR", "ArenaHard_WR")
"""The paper's Average Performance: mean of AlpacaEval 2 length-controlled win rate and Arena-Hard win rate."""


@dataclass(kw_only=True)
class PerformanceSettings:
    """The columns of a performance table averaged into AP, for every verb that reads one (`rank`, `calibrate`,
    `paradox`, `report`, `validate`): one declaration, one default."""

    performance_columns: list[str] = field(
        default_factory=lambda: list(DEFAULT_PERFORMANCE_COLUMNS),
        metadata={"help": "Benchmark columns averaged into AP; repeat the flag.", "flag": "--performance-column"},
    )


@dataclass(kw_only=True)
class AliasSettings:
    """Name aliases for matching a ranking's teacher and base-model names to a performance table's, for every verb
    that matches them (`rank`, `calibrate`, `report`, `validate`): one declaration."""

    aliases: str | None = field(
        default=None,
        metadata={
            "help": "YAML of 'name: name in the performance table' for spellings the matching rules miss (added to "
            "the shipped aliases of the paper's models; rules: Hub organisation, case, 'Meta-' and '-Base' aside)."
        },
    )


@dataclass(kw_only=True)
class ScoreCacheSettings:
    """The content-keyed score cache (:mod:`magpie_teach.scoring.cache`), the one store every verb that scores
    resumes from: `rank`, `probe` (live and replay) and `generate`'s scoring read what any of them stored."""

    cache: bool = field(
        default=True,
        metadata={
            "help": "Use the score cache: each example is scored once per model and setting, a killed run resumes, "
            "and a rerun with another beta, reward shift or performance table loads no model."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "The score cache's folder, shared by the runs that name it (default: $MAGPIE_TEACH_CACHE, "
            "else ~/.cache/magpie-teach/scores)."
        },
    )


@dataclass(kw_only=True)
class ClusterSettings:
    """Scoring on a Ray cluster (:mod:`magpie_teach.scoring.on_ray`): Ray Data runs the same scorer code in an
    actor pool, one model per actor."""

    ray_address: str | None = field(
        default=None,
        metadata={
            "help": "Score on the Ray cluster at this address (host:port of `ray start --head`, ray://host:10001, "
            "or auto: the cluster this machine joined, or $RAY_ADDRESS); the rows to score are staged in the "
            "output folder, which every node must read (shared storage); default: this process, one device."
        },
    )
    num_workers: int = field(
        default=1, metadata={"help": "Ray actors scoring at once, each holding one model (with --ray-address)."}
    )
    gpus_per_worker: float = field(
        default=0.0, metadata={"help": "GPUs each Ray actor takes (0: it scores on CPU; with --ray-address)."}
    )

    def check_cluster(self, where: str = "--") -> None:
        if self.num_workers < 1:
            raise ConfigError(f"{_key(where, 'num_workers')} must be >= 1, got {self.num_workers}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"{_key(where, 'gpus_per_worker')} must be >= 0, got {self.gpus_per_worker}")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ConfigError(f"{_key(where, 'ray_address')} is empty; give host:port, ray://host:port or auto")


@dataclass(kw_only=True)
class ScoringRunSettings(ModelRunSettings, ClusterSettings, ScoreCacheSettings):
    """What the scoring executor (:mod:`magpie_teach.scoring.executor`) runs: the models (base models, the reward
    model or a precomputed reward column, an optional reference model) with the model run's, the cluster's and the
    score cache's settings. `rank`'s config, `generate`'s ``scoring:`` block and `probe --replay` inherit it."""

    base_models: list[str] = field(
        default_factory=list,
        metadata={"help": "Base model (Hub id or folder); repeat the flag for several.", "flag": "--base-model"},
    )
    reward_model: str | None = field(
        default=None, metadata={"help": "Reward model (AutoModelForSequenceClassification with one output)."}
    )
    reward_column: str | None = field(
        default=None,
        metadata={
            "help": "Use this precomputed reward column instead of a reward model (e.g. ArmoRM-Llama3-8B-v0.1)."
        },
    )
    reference_model: str | None = field(
        default=None, metadata={"help": "Reference LM for perplexity/IFD baselines (GPT-2 in the paper)."}
    )

    def check_models(self, where: str = "--") -> None:
        """At least one base model, none twice, and exactly one of the reward model and the reward column."""
        if not self.base_models:
            raise ConfigError(f"give at least one {_key(where, 'base_model')}")
        if len(set(self.base_models)) != len(self.base_models):
            raise ConfigError(f"{_key(where, 'base_model')}: repeated entries in {self.base_models}")
        if (self.reward_model is None) == (self.reward_column is None):
            raise ConfigError(f"give exactly one of {_key(where, 'reward_model')} and {_key(where, 'reward_column')}")


@dataclass(kw_only=True)
class ConfidenceSettings:
    """How sure a ranking is: a paired bootstrap over instructions (see :mod:`magpie_teach.scoring.confidence`)."""

    bootstrap: int = field(
        default=DEFAULT_BOOTSTRAP,
        metadata={"help": "Bootstrap replicates for the intervals and p_best (0 turns them off)."},
    )
    confidence: float = field(
        default=DEFAULT_CONFIDENCE, metadata={"help": "Level of the intervals, and of 'separated' in summary.json."}
    )
    bootstrap_seed: int = field(
        default=DEFAULT_BOOTSTRAP_SEED, metadata={"help": "Seed of the bootstrap (same seed, same intervals)."}
    )

    def check_confidence(self, where: str = "--") -> None:
        if self.bootstrap < 0:
            raise ConfigError(f"{_key(where, 'bootstrap')} must be >= 0 (0 turns it off), got {self.bootstrap}")
        if not 0 < self.confidence < 1:
            raise ConfigError(
                f"{_key(where, 'confidence')} must be between 0 and 1 (e.g. 0.95), got {self.confidence}"
            )


JUDGE_BACKENDS = ("transformers", "openai")


@dataclass(kw_only=True)
class JudgeSettings:
    """Who judges students' answers against a baseline's (:mod:`magpie_teach.evaluation.evaluate`): a judge LLM asked
    in both orders, or a reward model; and the baseline, a model answering the same way or a file of answers."""

    judge: str | None = field(
        default=None,
        metadata={"help": "Judge LLM (model path or Hub id; with --judge-backend openai, the served name)."},
    )
    judge_backend: str = field(
        default="transformers",
        metadata={"help": "How the judge runs: transformers, or openai (an OpenAI-compatible server at --judge-base-url).",
                  "choices": list(JUDGE_BACKENDS)},
    )  # fmt: skip
    judge_base_url: str | None = field(
        default=None, metadata={"help": "The judge's server (e.g. http://host:8000/v1)."}
    )
    judge_api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable holding the judge server's key (never logged)."},
    )
    judge_reward_model: str | None = field(
        default=None, metadata={"help": "A reward model as judge instead: preference = sigmoid(reward - baseline's)."}
    )
    baseline: str | None = field(
        default=None, metadata={"help": "Model whose answers every student is compared with (answered the same way)."}
    )
    baseline_answers: str | None = field(
        default=None, metadata={"help": "File of the baseline's answers instead (id or instruction, and response)."}
    )

    def check_judge(self, where: str = "--") -> None:
        if (self.judge is None) == (self.judge_reward_model is None):
            raise ConfigError(
                f"give one judge: {_key(where, 'judge')} (an LLM) or {_key(where, 'judge_reward_model')}"
            )
        if self.judge_backend not in JUDGE_BACKENDS:
            raise ConfigError(
                f"{_key(where, 'judge_backend')} {self.judge_backend!r} is not one of {', '.join(JUDGE_BACKENDS)}"
            )
        if self.judge is not None and self.judge_backend == "openai" and not self.judge_base_url:
            raise ConfigError(f"{_key(where, 'judge_backend')} openai needs {_key(where, 'judge_base_url')}")
        if (self.baseline is None) == (self.baseline_answers is None):
            raise ConfigError(
                f"give one baseline: {_key(where, 'baseline')} (a model) or {_key(where, 'baseline_answers')}"
            )


PROBE_METRICS = ("car", "reward", "compat_loss")


@dataclass(kw_only=True)
class ReplaySettings:
    """Responses already generated, replayed (every teacher on every instruction)."""

    replay: str | None = field(
        default=None,
        metadata={"help": "Replay: responses already generated (a file, saved folder or Hub id; long or Zoo layout)."},
    )
    revision: str | None = field(default=None, metadata={"help": "Revision of a Hub data set."})
    split: str = field(default="train", metadata={"help": "Split of a Hub data set or saved DatasetDict."})
    teachers: list[str] = field(
        default_factory=list, metadata={"help": "Only these teachers; repeat (default: all).", "flag": "--teacher"}
    )
    drop_invalid: bool = field(
        default=False, metadata={"help": "Drop instructions with invalid rows instead of failing (as rank does)."}
    )


@dataclass(kw_only=True)
class ProbeSettings:
    """The ``probe:`` block of a `generate` YAML (and `probe --replay`'s flags)."""

    start: int = field(default=32, metadata={"help": "Instructions in the first round."})
    growth: float = field(default=2.0, metadata={"help": "Each round covers this many times more instructions."})
    max_instructions: int | None = field(
        default=None, metadata={"help": "Budget: the most instructions a teacher answers (default: all there are)."}
    )
    confidence: float = field(
        default=DEFAULT_CONFIDENCE,
        metadata={"help": "Chance of never eliminating the truly best teacher (Bonferroni over teachers and rounds)."},
    )
    epsilon: float = field(
        default=0.01,
        metadata={"help": "Indifference margin, relative to the leader's value: survivors this close are a tie."},
    )
    metric: str = field(
        default="car", metadata={"help": "The metric teachers race on.", "choices": list(PROBE_METRICS)}
    )
    bootstrap: int = field(default=DEFAULT_BOOTSTRAP, metadata={"help": "Bootstrap replicates per round."})
    seed: int = field(default=0, metadata={"help": "Seed of the instruction order and of the bootstrap."})

    def validate(self, where: str = "probe.") -> None:
        def key(name: str) -> str:
            return _key(where, name)

        if self.start < 2:
            raise ConfigError(f"{key('start')} must be >= 2, got {self.start}")
        if self.growth <= 1:
            raise ConfigError(f"{key('growth')} must be > 1, got {self.growth}")
        if self.max_instructions is not None and self.max_instructions < self.start:
            raise ConfigError(f"{key('max_instructions')} ({self.max_instructions}) is below start ({self.start})")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"{key('confidence')} must be between 0 and 1, got {self.confidence}")
        if self.epsilon < 0:
            raise ConfigError(f"{key('epsilon')} must be >= 0, got {self.epsilon}")
        if self.metric not in PROBE_METRICS:
            raise ConfigError(f"{key('metric')} {self.metric!r} is not one of {', '.join(PROBE_METRICS)}")
        if self.bootstrap < 100:
            raise ConfigError(f"{key('bootstrap')} must be >= 100 for the probe's decisions, got {self.bootstrap}")


def _key(where: str, name: str) -> str:
    """A setting's name as the user wrote it: ``--max-length`` on the command line, ``scoring.max_length`` in YAML."""
    return f"--{name.replace('_', '-')}" if where == "--" else f"{where}{name}"
