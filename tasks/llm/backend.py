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
    vLLM if it starts, transformers if vLLM is missing or its engine fails to start. An engine
    that fails because the model itself does not load (:func:`check_model_loads`) is not a
    choice: :class:`ModelLoadError`, and the run folder records nothing.
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
        check_model_loads(policy)  # the model's fault: fail, choose nothing
        log.warning("auto backend: %s; this run generates with transformers", exc)
        return BackendChoice("transformers", f"auto: the vLLM engine did not start ({exc})")
    seconds = time.perf_counter() - t0
    return BackendChoice("vllm", f"auto: a vLLM engine started on the policy in {seconds:.0f} s")


class ModelLoadError(RuntimeError):
    """The policy model itself does not load (its configuration or tokenizer)."""


def check_model_loads(policy: str) -> None:
    """Raise :class:`ModelLoadError` (one line naming ``policy``) when transformers cannot read
    the model's configuration or tokenizer: no backend could generate with it."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(policy)
        AutoTokenizer.from_pretrained(policy)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"--policy-model {policy} does not load: {first}") from None
