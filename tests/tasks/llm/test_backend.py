"""The backend of a run is chosen once: ``auto`` is vLLM where its engine starts, else
transformers; an explicit backend is kept as asked."""

from __future__ import annotations

from pathlib import Path

import pytest

import tasks.llm.backend as backend_mod
from tasks.llm.backend import ModelLoadError, choose_backend
from tasks.llm.vllm_engine import GenerationError


def test_explicit_backend_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_mod, "VLLMEngine", None)  # never started for an explicit one
    assert choose_backend("transformers", "m").backend == "transformers"
    assert choose_backend("vllm", "m").backend == "vllm"


def test_auto_without_vllm_is_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_mod, "vllm_importable", lambda: False)
    choice = choose_backend("auto", "m")
    assert choice.backend == "transformers" and "not installed" in choice.reason


class _Engine:
    started: list[str] = []
    fail = False

    def __init__(self, model: str, **kwargs: object) -> None:
        self.model = model

    def __enter__(self) -> _Engine:
        if _Engine.fail:
            raise GenerationError("vLLM engine did not start: no CPU backend")
        _Engine.started.append(self.model)
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.mark.parametrize("fails, expected", [(False, "vllm"), (True, "transformers")])
def test_auto_is_vllm_where_its_engine_starts(
    monkeypatch: pytest.MonkeyPatch, fails: bool, expected: str
) -> None:
    monkeypatch.setattr(backend_mod, "vllm_importable", lambda: True)
    monkeypatch.setattr(backend_mod, "VLLMEngine", _Engine)
    monkeypatch.setattr(backend_mod, "check_model_loads", lambda policy: None)  # a placeholder
    _Engine.fail, _Engine.started = fails, []
    choice = choose_backend("auto", "policy-folder")
    assert choice.backend == expected
    assert ("did not start" in choice.reason) == fails
    assert _Engine.started == ([] if fails else ["policy-folder"])


def test_a_model_that_does_not_load_is_no_backend_choice(
    monkeypatch: pytest.MonkeyPatch, broken_config_llm: Path, tiny_llm_path: str
) -> None:
    """The engine fails because the model's config.json is cut: that is the model's fault, not
    vLLM's, so ``auto`` chooses nothing (before, it chose transformers and the run folder kept
    it after the config was fixed)."""
    monkeypatch.setattr(backend_mod, "vllm_importable", lambda: True)
    monkeypatch.setattr(backend_mod, "VLLMEngine", _Engine)
    _Engine.fail, _Engine.started = True, []
    with pytest.raises(ModelLoadError, match=r"--policy-model .*broken-model does not load"):
        choose_backend("auto", str(broken_config_llm))
    assert choose_backend("auto", tiny_llm_path).backend == "transformers"  # vLLM's own fault


@pytest.mark.slow
def test_auto_starts_a_real_vllm_engine(tiny_llm_path: str) -> None:
    pytest.importorskip("vllm")
    choice = choose_backend("auto", tiny_llm_path)
    assert choice.backend == "vllm", choice.reason
