"""The generation backend of a run, chosen once: ``auto`` becomes ``vllm`` where a vLLM engine
starts on this machine, else ``transformers``; the flows record the choice in the run folder and
keep it (:mod:`flows.run_record`), so every text of a run comes from one backend.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tasks.llm.vllm_engine import GenerationError, VLLMEngine, vllm_importable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendChoice:
    """``backend`` (``vllm`` or ``transformers``) and why it was chosen."""

    backend: str
    reason: str


def choose_backend(requested: str, policy: str) -> BackendChoice:
    """Resolve ``requested`` (``auto``, ``vllm`` or ``transformers``) for ``policy``.

    ``auto`` starts a vLLM engine on the policy once (about 15-20 s on a CPU) and closes it:
    vLLM if it starts, transformers if vLLM is missing or its engine fails to start.
    """
    if requested != "auto":
        return BackendChoice(requested, f"--backend {requested}")
    if not vllm_importable():
        return BackendChoice("transformers", "auto: vllm is not installed")
    t0 = time.perf_counter()
    try:
        with VLLMEngine(policy, max_model_len=256):
            pass
    except GenerationError as exc:
        log.warning("auto backend: %s; this run generates with transformers", exc)
        return BackendChoice("transformers", f"auto: the vLLM engine did not start ({exc})")
    seconds = time.perf_counter() - t0
    return BackendChoice("vllm", f"auto: a vLLM engine started on the policy in {seconds:.0f} s")
