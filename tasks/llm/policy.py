"""The policy of a pipeline stage: a base LLM plus the LoRA adapter a training stage made."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from tasks.common.stage import Artefact, InputRef


@dataclass(frozen=True)
class Policy:
    """A policy LLM: the base model, plus the training stage (DPO, SFT, RL) whose artefact is
    its LoRA adapter (``<out>/adapter``).

    Adapters are trained further round after round, never merged into the base; the sampler
    serves the merged checkpoint a trainer wrote beside the adapter, or base + adapter.
    """

    base: InputRef
    trained: Artefact | None = None

    @property
    def adapter(self) -> str | None:
        return self.trained.path if self.trained else None

    def serving(self) -> tuple[str, str | None]:
        """(model, adapter) to sample from: the merged checkpoint when DPO wrote one."""
        if self.trained is None:
            return self.base.path, None
        merged = str(Path(self.trained.path).with_name("merged"))
        return (merged, None) if merged in self.trained.extra else (self.base.path, self.adapter)

    def after(self, dpo: Artefact) -> Policy:
        """The policy a training stage produced (unchanged when it was skipped)."""
        return self if dpo.skipped else replace(self, trained=dpo)
