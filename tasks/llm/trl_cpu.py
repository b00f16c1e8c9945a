"""TRL's fused LM head on CPU: score only the answer's positions.

TRL's trainers compute per-token log-probabilities through a fused, chunked LM head
(``trl.trainer.utils.add_fused_lm_head``). On CUDA it scores only the positions with a label
(the answer); elsewhere it scores every position, prompt included, and masks the prompt's
afterwards, so that the tile shapes stay fixed for compilers such as Neuron's. On CPU nothing
is compiled, and with a ~510-token prompt and a ~96-token answer the head (49,152 x 576
weights) spends some 80% of its work on positions whose result is thrown away.
:func:`install` makes the head take the compact path on CPU too: the same log-probabilities and
gradients (the masked positions contribute zeros either way), less work
(``bench/bench_dpo.py --levers`` prints the figures). ``RLRF4REC_TRL_HEAD=full`` keeps TRL's
own choice (the benchmark's "before").
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

ENV = "RLRF4REC_TRL_HEAD"


def install() -> bool:
    """Score only labelled positions in TRL's fused LM head on CPU; whether it is in place."""
    if os.environ.get(ENV) == "full":
        return False
    try:
        from trl.trainer import utils
    except ImportError:
        return False
    current = getattr(utils, "_use_triton", None)
    if current is None:
        log.warning("trl.trainer.utils has no _use_triton: the LM head scores every position")
        return False
    if getattr(current, "compact_on_cpu", False):
        return True

    def compact(device: Any) -> bool:
        return device.type == "cpu" or current(device)

    compact.compact_on_cpu = True  # type: ignore[attr-defined]
    compact.original = current  # type: ignore[attr-defined]
    utils._use_triton = compact
    return True
