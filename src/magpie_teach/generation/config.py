"""The generation config: one YAML file per run, validated up front with key-path errors."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from magpie_teach.errors import ConfigError
from magpie_teach.scoring.routing import RoutingSettings
from magpie_teach.settings import (
    DTYPES,
    CARSettings,
    ConfidenceSettings,
    ProbeSettings,
    ReplaySettings,
    ScoringRunSettings,
)

BACKENDS = ("transformers", "vllm", "openai")
"""Backends a teacher can use: transformers (CPU or GPU, in the step's process), vllm (an engine in the
step's process), openai (an OpenAI-compatible server)."""


@dataclass
class SamplingConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None  # sampling seed; with one, a rerun of the same batch samples the same text


@dataclass
class TeacherConfig:
    name: str
    model: str
    backend: str = "transformers"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    num_generations: int = 1
    device: str = "auto"
    dtype: str = "auto"  # bfloat16 on a GPU, float32 on the CPU (modeling.dtype_for)
    # vllm backend: GPUs one engine spans, engine copies (distilabel step replicas), context length, and any other
    # keyword of `vllm.LLM` (e.g. gpu_memory_utilization, enforce_eager)
    tensor_parallel_size: int = 1
    replicas: int = 1
    max_model_len: int | None = None
    engine_kwargs: dict = field(default_factory=dict)
    # openai backend: an OpenAI-compatible server; the key comes from the environment variable named here
    base_url: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 120.0
    max_retries: int = 3
    concurrency: int = 8

    def settings(self) -> str:
        """The teacher's backend and sampling settings as JSON, kept on every row it writes."""
        settings = {"backend": self.backend, "model": self.model, "num_generations": self.num_generations,
                    **asdict(self.sampling)}  # fmt: skip
        return json.dumps(settings, sort_keys=True)


MAGPIE_TEMPLATES = {
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",  # Llama 3 / 3.1
    "qwen2": "<|im_start|>user\n",  # Qwen2 / Qwen2.5
    "gemma2": "<bos><start_of_turn>user\n",
    "phi3": "<|user|>\n",
    "chatml": "<|endoftext|><|im_start|>user\n",  # the project's default template (the tiny models)
}
"""Magpie pre-query templates: the chat template rendered up to where the user's text begins."""


@dataclass
class MagpieCategory:
    """A task category that steers Magpie (a system prompt), drawn for a row with probability weight / sum."""

    prompt: str
    weight: float = 1.0


@dataclass
class ScoringConfig(CARSettings, ConfidenceSettings, ScoringRunSettings):
    """Score the responses inside the run, with the engine `magpie-teach rank` uses (same numbers). CAR's, the
    bootstrap's, the model run's and the cluster's settings are inherited from :mod:`magpie_teach.settings`, with
    rank's defaults. On a Ray cluster (``ray_address``, else the run's ``ray:`` block) the scores come from rank's
    Ray Data path (:mod:`magpie_teach.scoring.on_ray`, ``num_workers`` actors of ``gpus_per_worker`` GPUs). The
    models and the score cache are the scoring run's (:class:`magpie_teach.settings.ScoringRunSettings`)."""

    def validate(self) -> None:
        if self.reward_column is not None:
            raise ConfigError("scoring.reward_column: a generate run's responses have no reward column; give "
                              "scoring.reward_model")  # fmt: skip
        if self.reward_model is None:
            raise ConfigError("scoring.reward_model: required (the reward model that scores the responses)")
        self.check_models("scoring.")
        self.check_car("scoring.")
        self.check_confidence("scoring.")
        self.check_run("scoring.")
        self.check_cluster("scoring.")


@dataclass
class MagpieConfig:
    model: str
    template: str = "chatml"  # a key of MAGPIE_TEMPLATES, or the literal pre-query string
    num_rows: int = 100
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    device: str = "auto"
    dtype: str = "auto"  # bfloat16 on a GPU, float32 on the CPU (modeling.dtype_for), as for the teachers
    # steering: one system prompt, or categories {name: {prompt, weight}} drawn per row by weight
    system_prompt: str | None = None
    categories: dict[str, MagpieCategory] = field(default_factory=dict)
    seed: int = 0  # seeds the category draw and the sampling
    # turns: 1 = single instructions; k > 1 = k user turns, the first k - 1 answered by this model, the
    # last one left for the teachers (its earlier turns become the row's `context`)
    n_turns: int = 1

    def pre_query(self) -> str:
        return MAGPIE_TEMPLATES.get(self.template, self.template)

    def system_prompts(self) -> str | dict | None:
        """The ``system_prompt`` argument of distilabel's ``MagpieGenerator``."""
        if self.categories:
            return {name: (c.prompt, c.weight / sum(x.weight for x in self.categories.values()))
                    for name, c in self.categories.items()}  # fmt: skip
        return self.system_prompt

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"instructions.magpie.dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.system_prompt and self.categories:
            raise ConfigError("instructions.magpie: give system_prompt or categories, not both")
        for name, category in self.categories.items():
            if not category.weight > 0:
                raise ConfigError(f"instructions.magpie.categories.{name}.weight: must be > 0, got {category.weight}")
        if self.n_turns < 1:
            raise ConfigError(f"instructions.magpie.n_turns: must be >= 1, got {self.n_turns}")
        if self.num_rows < 1:
            raise ConfigError(f"instructions.magpie.num_rows: must be >= 1, got {self.num_rows}")


@dataclass
class InstructionsConfig:
    path: str | None = None
    magpie: MagpieConfig | None = None
    revision: str | None = None
    split: str = "train"
    column: str = "instruction"
    min_chars: int | None = None
    max_chars: int | None = None
    sample: int | None = None
    seed: int = 0
    dedup: bool = True


@dataclass
class RayConfig:
    """Run the pipeline on a Ray cluster (distilabel's RayPipeline): ``address`` of its head node, e.g.
    ``127.0.0.1:6379`` from ``ray start --head``, ``ray://host:10001``, or ``auto`` inside a Ray job.
    Every node must see ``output_dir`` (shared storage), where the response store is."""

    address: str = "auto"
    init_kwargs: dict = field(default_factory=dict)


@dataclass
class GenerateConfig:
    output_dir: str
    instructions: InstructionsConfig
    teachers: list[TeacherConfig]
    batch_size: int = 8
    scoring: ScoringConfig | None = None
    ray: RayConfig | None = None
    probe: ProbeSettings | None = None  # read by `magpie-teach probe` (`generate` generates the full grid)
    # each instruction written by one teacher: a `route` folder's choice, or an assignment file's
    routing: RoutingSettings | None = None

    def __post_init__(self) -> None:
        if (self.instructions.path is None) == (self.instructions.magpie is None):
            raise ConfigError(
                "instructions: give exactly one of path (a file or Hub data set) and magpie (generate them)"
            )
        if self.instructions.magpie is not None:
            self.instructions.magpie.validate()
        if self.scoring is not None:
            self.scoring.validate()
        if self.probe is not None:
            self.probe.validate()
        if self.routing is not None:
            self.routing.check_routing()
            if self.scoring is not None:
                raise ConfigError("routing: and scoring: together: a routed run's teachers answer different "
                                  "instructions, which `rank`'s scoring cannot compare; remove scoring: (select "
                                  "--strategy routed takes the routed folder as it is)")  # fmt: skip
        names = [t.name for t in self.teachers]
        if not names:
            raise ConfigError("teachers: at least one teacher is needed")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ConfigError(f"teachers: names must be unique, {duplicated} repeat")
        for i, teacher in enumerate(self.teachers):
            if teacher.backend == "openai" and not teacher.base_url:
                raise ConfigError(
                    f"teachers[{i}].base_url: the openai backend needs the server's URL, e.g. http://host:8000/v1"
                )
            if teacher.backend not in BACKENDS:
                raise ConfigError(
                    f"teachers[{i}].backend: {teacher.backend!r} is not available in this version (available: {', '.join(BACKENDS)})"
                )
            if teacher.dtype not in DTYPES:
                raise ConfigError(f"teachers[{i}].dtype: {teacher.dtype!r} is not one of {', '.join(DTYPES)}")
            if teacher.num_generations < 1:
                raise ConfigError(f"teachers[{i}].num_generations: must be >= 1")
            if not 0 < teacher.sampling.top_p <= 1 or teacher.sampling.temperature < 0:
                raise ConfigError(f"teachers[{i}].sampling: need temperature >= 0 and 0 < top_p <= 1")
        if self.batch_size < 1:
            raise ConfigError("batch_size: must be >= 1")


def _absolute(value: str | None, key: str = "") -> str | None:
    """A relative path that exists here, made absolute; a Hub id (``name`` or ``org/name``) or None unchanged;
    anything that can only be a path (``./x``, ``/x``, ``a/b/c``) but does not exist is an error naming ``key``."""
    if not value:
        return value
    from magpie_teach.modeling import check_model_source

    if Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return check_model_source(value, key) if key else value


def locate_models(config: GenerateConfig) -> None:
    """Every model the run loads (Magpie's, the teachers' but an OpenAI-compatible server's, the scoring stage's)
    located before the first one loads (:func:`magpie_teach.modeling.locate_model`): a teacher named last that the
    Hub lacks fails now, not after the others have generated."""
    from magpie_teach.modeling import locate_model

    named = {}
    if config.instructions.magpie is not None:
        named[config.instructions.magpie.model] = "instructions.magpie.model"
    for i, teacher in enumerate(config.teachers):
        if teacher.backend != "openai":
            named.setdefault(teacher.model, f"teachers[{i}].model")
    if config.scoring is not None:
        if config.scoring.reward_model:
            named.setdefault(config.scoring.reward_model, "scoring.reward_model")
        for i, base in enumerate(config.scoring.base_models):
            named.setdefault(base, f"scoring.base_models[{i}]")
    for model, key in named.items():
        if model:
            locate_model(model, key)


def with_absolute_paths(config: GenerateConfig) -> GenerateConfig:
    """Relative paths resolved against this process's folder: the pipeline's steps may run elsewhere (Ray
    workers keep their own working directory), and they must read and write the same files."""
    config.output_dir = str(Path(config.output_dir).resolve())
    config.instructions.path = _absolute(config.instructions.path, "instructions.path")
    if config.instructions.magpie is not None:
        config.instructions.magpie.model = _absolute(config.instructions.magpie.model, "instructions.magpie.model")
    for i, teacher in enumerate(config.teachers):
        if teacher.backend != "openai":  # an openai model is the server's name for it
            teacher.model = _absolute(teacher.model, f"teachers[{i}].model")
    if config.routing is not None:
        config.routing.router = _absolute(config.routing.router)
        config.routing.assignments = _absolute(config.routing.assignments)
    if config.scoring is not None:
        config.scoring.reward_model = _absolute(config.scoring.reward_model, "scoring.reward_model")
        config.scoring.base_models = [
            _absolute(b, f"scoring.base_models[{i}]") for i, b in enumerate(config.scoring.base_models)
        ]
    return config


def load_generate_config(path: str) -> GenerateConfig:
    from magpie_teach.config import from_dict, read_yaml_mapping

    values = read_yaml_mapping(path)
    try:
        return with_absolute_paths(from_dict(GenerateConfig, values))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


@dataclass
class ReplayConfig(ProbeSettings, CARSettings, ScoringRunSettings, ReplaySettings):
    """`probe --replay`'s settings; the probe's (``start``, ``growth``, ...), CAR's, the scoring run's (the
    models, the model run, the cluster, the score cache) and the replayed responses' are inherited."""

    output_dir: str | None = field(default=None, metadata={"help": "Output folder.", "flag": "--output"})

    def __post_init__(self) -> None:
        if not self.replay or not self.output_dir:
            raise ConfigError("give a generate YAML with a probe: block, or --replay DATA --output DIR")
        self.check_models()
        self.validate("--")
        self.check_car()
        self.check_run()
        self.check_cluster()
