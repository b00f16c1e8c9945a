"""What a run folder remembers about itself across resumes (``<run>/run.json``): the settings
that change results without being a parameter (the generation backend ``auto`` resolved to, the
CPU dtype) and the MLflow parent run, so that a resume keeps both.

A resume whose machine or request would change a recorded setting is refused
(:class:`SettingChangedError`, one line naming the setting) unless the run asks for it
(``--allow-setting-change``); the stages keyed on the setting then run again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.common.io import atomic_path

RECORD_NAME = "run.json"


class SettingChangedError(RuntimeError):
    """A resume would change a setting the run folder recorded."""


@dataclass
class RunRecord:
    """The contents of ``<run>/run.json``.

    Attributes:
        settings: ``{name: value}`` of the recorded settings (``backend``, ``cpu_dtype``).
        reasons: ``{name: why}`` for each setting, for the report.
        mlflow: ``{"tracking_uri", "experiment_id", "parent_run_id"}`` of the run's parent run.
        prefect: ``{"flow_run_id"}`` of the last start's Prefect flow run.
        starts: how many times the run was started (1 for a fresh run).
    """

    settings: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    mlflow: dict[str, str] = field(default_factory=dict)
    prefect: dict[str, str] = field(default_factory=dict)
    starts: int = 0

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord:
        path = Path(run_dir) / RECORD_NAME
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            fields = ("settings", "reasons", "mlflow", "starts")
            return cls(**{k: data[k] for k in fields}, prefect=data.get("prefect", {}))
        except (ValueError, KeyError, TypeError) as exc:
            raise SettingChangedError(
                f"{path}: unreadable run record ({exc}); move it away to start the run afresh"
            ) from None

    def save(self, run_dir: Path) -> Path:
        path = Path(run_dir) / RECORD_NAME
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    def keep(self, name: str, value: str, reason: str, *, allow_change: bool, hint: str) -> str:
        """Record ``name = value``, or check it against the value recorded by an earlier start.

        Returns the value the run uses. Raises :class:`SettingChangedError` when the recorded
        value differs and ``allow_change`` is false; ``hint`` says how to keep the old value.
        """
        old = self.settings.get(name)
        if old is not None and old != value and not allow_change:
            raise SettingChangedError(
                f"this run folder was started with {name}={old} ({self.reasons.get(name, '')}); "
                f"now {name}={value} ({reason}). {hint}, or pass --allow-setting-change to "
                f"recompute what depends on it"
            )
        if old != value:
            self.settings[name] = value
            self.reasons[name] = reason
        return value

    def summary(self) -> dict[str, Any]:
        """``{name: {"value", "reason"}}`` for the report and MLflow."""
        return {
            k: {"value": v, "reason": self.reasons.get(k, "")} for k, v in self.settings.items()
        }
