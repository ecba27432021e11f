"""magpie-teach: which teacher model should write the responses for my base model?

The heavy modules (torch, transformers) are imported only when a function that needs them is called,
so `import magpie_teach` and `magpie-teach --help` stay fast.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "RankConfig": "magpie_teach.ranking.rank",
    "rank": "magpie_teach.ranking.rank",
    "score_compatibility": "magpie_teach.scoring.compatibility",
    "score_reward": "magpie_teach.scoring.reward",
    "car": "magpie_teach.scoring.metrics",
    "ifd": "magpie_teach.scoring.metrics",
    "ic_ifd": "magpie_teach.scoring.metrics",
    "find_paradox_pairs": "magpie_teach.scoring.paradox",
    "load_responses": "magpie_teach.data",
    "MagpieTeachError": "magpie_teach.errors",
    "ConfigError": "magpie_teach.errors",
    "DataError": "magpie_teach.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'magpie_teach' has no attribute {name!r}")
