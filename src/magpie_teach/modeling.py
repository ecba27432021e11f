"""Loading models and tokenizers: the same code for a Hub id, a Hub id at a revision, and a local folder."""

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from magpie_teach.errors import ConfigError, network_errors
from magpie_teach.settings import DTYPES

logger = logging.getLogger(__name__)


NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
"""Where the NVIDIA driver lists the machine's GPUs (one folder each), whatever torch can see."""


def cuda_visible() -> bool:
    """Whether torch sees a CUDA GPU, asked without initialising CUDA in this process: distilabel's steps and vLLM's
    engine are forked from it, and a forked child cannot use CUDA once its parent has initialised it ("Cannot
    re-initialize CUDA in forked subprocess"). PyTorch's NVML-based check counts the GPUs without that."""
    import torch

    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # read by torch.cuda at each call; children inherit it
    return torch.cuda.is_available()


def resolve_device(device: str = "auto") -> str:
    """``auto`` is ``cuda`` when a GPU is visible, else ``cpu``, with a warning when the machine has NVIDIA GPUs
    that torch cannot use (a CPU build of torch, ``CUDA_VISIBLE_DEVICES`` empty): a run meant for them would
    otherwise go on at CPU speed without a word."""
    if device == "auto":
        if cuda_visible():
            return "cuda"
        gpus = len(list(NVIDIA_GPUS.iterdir())) if NVIDIA_GPUS.is_dir() else 0
        if gpus:
            import torch

            logger.warning("device auto: this machine has %d NVIDIA GPU(s) but torch %s sees none (CUDA_VISIBLE_DEVICES"
                           "=%r): running on the CPU, much slower; install a CUDA build of torch (see the README)",
                           gpus, torch.__version__, os.environ.get("CUDA_VISIBLE_DEVICES"))  # fmt: skip
        return "cpu"
    if device.startswith("cuda") and not cuda_visible():
        raise ConfigError(f"device={device!r} was asked for but no CUDA GPU is visible.")
    return device


def dtype_for(dtype: str, device: str) -> str:
    """The dtype a model runs in on DEVICE: ``auto`` is bfloat16 on a GPU (what the paper's models are trained and
    served in; float32 there is several times slower and twice the memory) and float32 on the CPU (where bfloat16
    matmuls are slow on most processors); any other value as given. The score cache's keys name the result, so a
    CPU run with ``auto`` reads what one with ``float32`` stored."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def resolve_dtype(dtype: str, device: str = "cpu") -> Any:
    import torch

    return getattr(torch, dtype_for(dtype, device))


def check_model_source(value: str, key: str) -> str:
    """A model is a local folder or a Hub id (``name`` or ``org/name``). A VALUE that can only be a path
    (``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c``) and is not a folder here is a ConfigError naming KEY, raised at
    once rather than after the Hub has been asked for it; returns VALUE."""
    if value and not Path(value).expanduser().exists() and (value.startswith((".", "/", "~")) or value.count("/") > 1):
        raise ConfigError(f"{key}: {value!r} is not a folder here, and not a Hub id (org/name) either")
    return value


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


@functools.cache
def hub_reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to ENDPOINT opens within TIMEOUT seconds (asked once per process)."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    """huggingface_hub's offline switch: HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE which it honours as well."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.lower() in ("1", "true", "yes", "on")


def _not_available(label: str) -> ConfigError:
    """The one-line error for a Hub model that can be had neither from the Hub (offline, or unreachable) nor from the
    Hugging Face cache; LABEL says which model and where it was named."""
    why = (
        "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)"
        if _offline()
        else f"the Hub at {hub_endpoint()} cannot be reached"
    )
    return ConfigError(
        f"{label}: it is not a folder here, {why}, and it is not in the Hugging Face cache. Use a local folder, "
        "download it first where there is a network (it is then read from the cache, with HF_HUB_OFFLINE=1 to skip "
        "the Hub), or set HF_ENDPOINT to a reachable mirror."
    )


@functools.cache
def hub_model_commit(repo_id: str) -> str:
    """The commit of Hub model REPO_ID, asked once per process (locating a model and naming it for the score cache
    both need it); huggingface_hub's errors pass through (an error is not cached)."""
    from huggingface_hub import HfApi

    return HfApi().model_info(repo_id).sha


def from_pretrained(load: Callable[..., Any], name_or_path: str, what: str, **kwargs: Any) -> Any:
    """``load(name_or_path, **kwargs)`` (a ``from_pretrained``) with errors a user can act on, as one line.

    A Hub id is looked up in the Hugging Face cache alone when the Hub cannot be reached (instead of
    minutes of retries), and fails naming the endpoint and how to work offline when it is not there.
    """
    local = Path(name_or_path).expanduser().is_dir()
    unreachable = not local and not _offline() and not hub_reachable(hub_endpoint())
    try:
        return load(str(Path(name_or_path).expanduser()) if local else name_or_path,
                    **({"local_files_only": True} if unreachable else {}), **kwargs)  # fmt: skip
    except (*network_errors(), ValueError) as err:
        if unreachable or (not local and _offline()):
            raise _not_available(f"Could not load {what} {name_or_path!r}") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"Could not load {what} {name_or_path!r}: {first}") from err


def locate_model(name_or_path: str, what: str) -> str:
    """Where NAME_OR_PATH would be loaded from (a local folder, a Hub commit, the Hugging Face cache), found without
    loading anything: a run checks every model it names this way before the first one loads, so a mistyped or
    unreachable model fails at once and not after the others have scored. A ConfigError naming WHAT when it cannot
    be loaded at all."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{what}: the folder {name_or_path!r} holds no config.json: it is not a saved model")
        return f"local folder {path.resolve()}"
    check_model_source(name_or_path, what)
    from huggingface_hub import try_to_load_from_cache

    if not _offline() and hub_reachable(hub_endpoint()):
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        try:
            return f"the Hub ({hub_endpoint()}), commit {hub_model_commit(name_or_path)}"
        except GatedRepoError:
            raise ConfigError(f"{what}: {name_or_path!r} is gated on the Hub; accept its terms and log in "
                              "(hf auth login), or use a local copy") from None  # fmt: skip
        except RepositoryNotFoundError:
            raise ConfigError(f"{what}: no model {name_or_path!r} on the Hub at {hub_endpoint()} (or it is "
                              "private and no token is set)") from None  # fmt: skip
        except network_errors() as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{what}: could not look up {name_or_path!r} on the Hub at {hub_endpoint()}: "
                              f"{first}") from None  # fmt: skip
    cached = try_to_load_from_cache(name_or_path, "config.json")
    if isinstance(cached, str):  # .../snapshots/<commit>/config.json
        return f"the Hugging Face cache, commit {Path(cached).parent.name}"
    raise _not_available(f"{what} {name_or_path!r}")


@functools.cache
def attention_for(name_or_path: str, revision: str | None = None) -> str | None:
    """``"eager"`` for a model whose attention soft-caps its logits (Gemma-2: ``attn_logit_softcapping``), else
    None (transformers' default). PyTorch's SDPA kernels have no soft-capping: loaded with the default, Gemma-2 is
    scored without it (its logits do not change when the cap does) although it was trained, and is fine-tuned
    here, with it."""
    from transformers import AutoConfig

    try:
        config = from_pretrained(AutoConfig.from_pretrained, name_or_path, "the config of", revision=revision)
    except ConfigError:
        return None  # the model's own load names what is wrong
    configs = [config, getattr(config, "text_config", None)]
    if any(getattr(c, "attn_logit_softcapping", None) for c in configs if c is not None):
        return "eager"
    return None


def device_map_for(device: str) -> Any:
    """Where ``from_pretrained`` puts the weights for DEVICE, so that they go straight there instead of through host
    memory first (eight Ray actors loading an 8B model at once): ``cuda`` spreads the layers over the visible GPUs
    in order, each taking what the one before could not hold (accelerate's ``"sequential"``: a model that fits one
    GPU stays on it; a larger one spans as many as it needs, as on a Ray actor with ``--gpus-per-worker 2``);
    ``cuda:N`` is that GPU; on the CPU, None (transformers' default)."""
    if device == "cuda":
        return "sequential"
    if device.startswith("cuda:"):
        return {"": device}
    return None


def gpu_memory() -> dict[int, int]:
    """What a model loaded with ``device_map`` may fill on each visible GPU: 90% of its free bytes (the rest for
    the activations), and nothing on the CPU or the disk."""
    import torch

    return {i: int(0.9 * torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())}


def check_on_gpus(name_or_path: str, placed: dict | None) -> None:
    """A ConfigError when part of a model was left off the GPUs (accelerate puts what no GPU can hold on the CPU or
    the disk, where it runs many times slower without a word); PLACED is the model's ``hf_device_map``."""
    off = sorted({str(v) for v in (placed or {}).values() if str(v) in ("cpu", "disk")})
    if off:
        raise ConfigError(f"model {name_or_path!r} does not fit in the visible GPUs' free memory (part of it would "
                          f"run from the {' and '.join(off)}): free GPU memory, use more GPUs (Ray: "
                          "--gpus-per-worker), or a smaller dtype")  # fmt: skip


def load_tokenizer(name_or_path: str, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    from magpie_teach.chat import prepare_tokenizer

    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name_or_path, "the tokenizer of", revision=revision)
    return prepare_tokenizer(tokenizer)


def load_model(
    name_or_path: str,
    kind: str = "causal-lm",
    dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
) -> Any:
    """Loads an ``AutoModelForCausalLM`` (``kind="causal-lm"``) or ``AutoModelForSequenceClassification``
    (``kind="reward"``) in eval mode on ``device``, in ``dtype`` (``auto``: :func:`dtype_for`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = {"causal-lm": AutoModelForCausalLM, "reward": AutoModelForSequenceClassification}[kind]
    device = resolve_device(device)
    attention = attention_for(name_or_path, revision)
    extra = {"attn_implementation": attention} if attention else {}
    dtype = dtype_for(dtype, device)
    placement = device_map_for(device)
    if placement is not None:
        extra["device_map"] = placement
        if placement == "sequential":
            extra["max_memory"] = gpu_memory()
    model, info = from_pretrained(cls.from_pretrained, name_or_path, f"{kind} model", revision=revision,
                                  dtype=resolve_dtype(dtype, device), output_loading_info=True, **extra)  # fmt: skip
    check_on_gpus(name_or_path, getattr(model, "hf_device_map", None))
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would initialise them at random and go on: random rewards, cached as if real
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        hint = (" It is not a sequence-classification reward model with its head saved (a causal LM, or a model "
                "whose head lives in its own remote code, such as ArmoRM: score with its rewards as a column, "
                "--reward-column)." if kind == "reward" else "")  # fmt: skip
        raise ConfigError(f"{kind} model {name_or_path!r}: its checkpoint has no weights for {shown}, which "
                          f"transformers would initialise at random.{hint}")  # fmt: skip
    if attention:
        logger.info("%s: %s attention (its logits are soft-capped; SDPA would drop the cap)", name_or_path, attention)
    where = device
    if placement is not None:  # already there
        gpus = sorted({str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()})
        where = f"GPU(s) {', '.join(gpus)}" if len(gpus) > 1 else device
    print(f"loaded {kind} model {name_or_path} ({model.num_parameters() / 1e6:.1f}M parameters) on {where} in "
          f"{dtype}", file=sys.stderr, flush=True)  # fmt: skip
    return (model if placement is not None else model.to(device)).eval()
