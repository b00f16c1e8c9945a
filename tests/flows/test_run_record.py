"""The run record keeps a run folder's backend and CPU dtype across resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.run_record import RunRecord, SettingChangedError


def test_a_setting_is_recorded_and_kept(tmp_path: Path) -> None:
    record = RunRecord()
    assert record.keep("backend", "vllm", "auto: started", allow_change=False, hint="") == "vllm"
    record.save(tmp_path)
    again = RunRecord.load(tmp_path)
    assert again.settings == {"backend": "vllm"}
    assert again.summary() == {"backend": {"value": "vllm", "reason": "auto: started"}}
    assert again.keep("backend", "vllm", "auto", allow_change=False, hint="") == "vllm"


def test_a_changed_setting_is_refused_naming_it(tmp_path: Path) -> None:
    record = RunRecord(settings={"cpu_dtype": "bfloat16"}, reasons={"cpu_dtype": "amx_bf16"})
    with pytest.raises(SettingChangedError) as exc:
        record.keep("cpu_dtype", "float32", "no bf16", allow_change=False, hint="set X")
    message = str(exc.value)
    assert "cpu_dtype=bfloat16" in message and "cpu_dtype=float32" in message
    assert "set X" in message and "--allow-setting-change" in message
    assert record.settings == {"cpu_dtype": "bfloat16"}  # nothing changed by the refusal


def test_a_change_asked_for_is_recorded(tmp_path: Path) -> None:
    record = RunRecord(settings={"cpu_dtype": "bfloat16"}, reasons={"cpu_dtype": "amx_bf16"})
    assert record.keep("cpu_dtype", "float32", "no bf16", allow_change=True, hint="") == "float32"
    assert record.summary()["cpu_dtype"] == {"value": "float32", "reason": "no bf16"}


def test_an_unreadable_record_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text('{"settings": ')
    with pytest.raises(SettingChangedError, match=r"run\.json: unreadable run record"):
        RunRecord.load(tmp_path)
