"""`magpie-teach paradox`: the verb over :func:`magpie_teach.scoring.paradox.find_paradox_pairs` (reads a
performance table, prints the pairs, writes them to a CSV when asked)."""

from dataclasses import dataclass, field

import pandas as pd

from magpie_teach.scoring.paradox import paradox_report
from magpie_teach.settings import PerformanceSettings


@dataclass
class ParadoxConfig(PerformanceSettings):
    performance: str = field(
        metadata={
            "help": "CSV with teacher (or generator), base_model, benchmark columns, and family/size columns "
            "(or --families)."
        }
    )
    families: str | None = field(
        default=None, metadata={"help": "CSV with teacher, family, size (overrides the performance file's)."}
    )
    output: str | None = field(default=None, metadata={"help": "Also write the pairs to this CSV."})


def paradox(config: ParadoxConfig) -> pd.DataFrame:
    """The Larger Models' Paradox pairs of CONFIG's performance table (see :func:`find_paradox_pairs`); written to
    ``config.output`` as CSV (atomically) when given."""
    from magpie_teach.artefacts import write_atomic

    pairs = paradox_report(config.performance, config.families, config.performance_columns)
    if config.output:
        write_atomic(config.output, lambda tmp: pairs.to_csv(tmp, index=False))
    return pairs
