"""The sampling settings of one generation call, and the raw samples a backend returns, shared
by the generator and its backends."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings of one generation call.

    Attributes:
        n: answers per prompt.
        temperature: softmax temperature; 0 means greedy (the n answers are then identical).
        top_p: nucleus sampling mass (1.0 disables it). No top-k on either backend.
        max_new_tokens: token budget of an answer; an answer cut there is flagged degenerate.
        seed: seed of the sampler.
    """

    n: int = 4
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingConfig.n must be a positive int, got {self.n!r}")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingConfig.max_new_tokens must be a positive int, got {self.max_new_tokens!r}"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SamplingConfig.seed must be an int >= 0, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON, MLflow params and the worker)."""
        return asdict(self)


def raw_sample_rows() -> dict[str, list]:
    """Empty columns for a backend's samples, filled one answer at a time:
    ``idx`` (the prompt's position), ``sample_idx``, ``text``, ``n_tokens``, ``finish``."""
    return {k: [] for k in ("idx", "sample_idx", "text", "n_tokens", "finish")}


def raw_samples_frame(rows: dict[str, list]) -> pl.DataFrame:
    """The samples of :func:`raw_sample_rows` as a frame: ``idx`` Int64, ``sample_idx`` Int32,
    ``text`` Utf8, ``n_tokens`` Int32, ``finish_reason`` Utf8 (``stop`` or ``length``)."""
    import polars as pl

    return pl.DataFrame(
        {
            "idx": pl.Series(rows["idx"], dtype=pl.Int64),
            "sample_idx": pl.Series(rows["sample_idx"], dtype=pl.Int32),
            "text": pl.Series(rows["text"], dtype=pl.Utf8),
            "n_tokens": pl.Series(rows["n_tokens"], dtype=pl.Int32),
            "finish_reason": pl.Series(rows["finish"], dtype=pl.Utf8),
        }
    )
