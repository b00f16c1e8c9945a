"""The stage mechanism: what is served from a manifest, what runs again, and why."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tasks.common import stage as stage_mod
from tasks.common.stage import Artefact, InputRef, code_version, manifest_path, run_stage

CALLS: list[str] = []


@dataclasses.dataclass(frozen=True)
class Cfg:
    scale: int = 2


def write_numbers(out: Path, cfg: Cfg, n: int = 3) -> Artefact:
    CALLS.append("write")
    out.write_text(",".join(str(cfg.scale * i) for i in range(n)))
    return Artefact(str(out), stats={"n": n})


def add_one(source: Artefact, out: Path) -> Artefact:
    CALLS.append("add")
    values = [int(v) + 1 for v in Path(source.path).read_text().split(",")]
    out.write_text(",".join(map(str, values)))
    return Artefact(str(out))


def pair_like(out: Path) -> Artefact:
    from tasks.pairing import build_pairs  # noqa: F401 - what the code version must follow

    return Artefact(str(out))


@pytest.fixture(autouse=True)
def _calls():
    CALLS.clear()


def test_same_arguments_are_served_from_the_manifest(tmp_path: Path) -> None:
    first = run_stage("numbers", write_numbers, out=tmp_path / "a.txt", cfg=Cfg())
    again = run_stage("numbers", write_numbers, out=tmp_path / "a.txt", cfg=Cfg())
    assert CALLS == ["write"]
    assert not first.cached and again.cached
    assert again.fingerprint == first.fingerprint and again.stats == {"n": 3}
    assert manifest_path(tmp_path / "a.txt").name == ".a.txt.stage.json"


def test_a_changed_parameter_runs_again_and_changes_the_fingerprint(tmp_path: Path) -> None:
    first = run_stage("numbers", write_numbers, out=tmp_path / "a.txt", cfg=Cfg())
    other = run_stage("numbers", write_numbers, out=tmp_path / "a.txt", cfg=Cfg(scale=3))
    assert CALLS == ["write", "write"]
    assert other.fingerprint != first.fingerprint
    assert (tmp_path / "a.txt").read_text() == "0,3,6"


def test_downstream_runs_again_only_when_upstream_changed(tmp_path: Path) -> None:
    up = run_stage("numbers", write_numbers, out=tmp_path / "a.txt", cfg=Cfg())
    run_stage("add", add_one, up, out=tmp_path / "b.txt")
    up = run_stage("numbers", write_numbers, out=tmp_path / "a.txt", cfg=Cfg())  # cached
    run_stage("add", add_one, up, out=tmp_path / "b.txt")
    assert CALLS == ["write", "add"]
    up = run_stage("numbers", write_numbers, out=tmp_path / "a.txt", cfg=Cfg(scale=5))
    down = run_stage("add", add_one, up, out=tmp_path / "b.txt")
    assert CALLS == ["write", "add", "write", "add"]
    assert not down.cached and (tmp_path / "b.txt").read_text() == "1,6,11"


def test_deleted_or_edited_outputs_run_again_touched_ones_do_not(tmp_path: Path) -> None:
    out = tmp_path / "a.txt"
    first = run_stage("numbers", write_numbers, out=out, cfg=Cfg())
    os.utime(out, ns=(1, 1))  # same bytes, other mtime: still served
    assert run_stage("numbers", write_numbers, out=out, cfg=Cfg()).cached
    out.unlink()
    again = run_stage("numbers", write_numbers, out=out, cfg=Cfg())
    assert not again.cached and out.exists()
    # Deterministic: the same bytes again give the same fingerprint, so downstream is kept.
    assert again.fingerprint == first.fingerprint
    out.write_text("9,9,9")
    assert not run_stage("numbers", write_numbers, out=out, cfg=Cfg()).cached
    assert out.read_text() == "0,2,4"
    assert CALLS == ["write", "write", "write"]


def test_folder_outputs_and_extra_files(tmp_path: Path) -> None:
    def folder(out: Path) -> Artefact:
        CALLS.append("folder")
        (out / "sub").mkdir(parents=True, exist_ok=True)
        (out / "sub" / "w.bin").write_bytes(b"abc")
        (tmp_path / "side.json").write_text("{}")
        return Artefact(str(out), extra=(str(tmp_path / "side.json"),))

    run_stage("folder", folder, out=tmp_path / "f")
    assert run_stage("folder", folder, out=tmp_path / "f").cached
    (tmp_path / "side.json").unlink()
    assert not run_stage("folder", folder, out=tmp_path / "f").cached
    (tmp_path / "f" / "sub" / "w.bin").write_bytes(b"abd")
    assert not run_stage("folder", folder, out=tmp_path / "f").cached
    assert CALLS == ["folder"] * 3


def test_input_refs_follow_their_files(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights").write_bytes(b"1")
    before = InputRef.of(model)
    os.utime(model / "weights", ns=(5, 5))
    assert InputRef.of(model).stamp != before.stamp
    assert InputRef.of("org/hub-id") == InputRef.of("org/hub-id")


def test_code_version_follows_the_modules_a_stage_reaches(monkeypatch) -> None:
    before = code_version(pair_like)
    original = stage_mod._module_source

    def edited(name: str, target: str) -> str:
        return original(name) + ("\n# edited\n" if name == target else "")

    for target, changes in (("tasks.pairing", True), ("tasks.direct.title_mapping", False)):
        stage_mod._module_closure.cache_clear()
        monkeypatch.setattr(stage_mod, "_module_source", lambda n, t=target: edited(n, t))
        assert (code_version(pair_like) != before) is changes, target
    stage_mod._module_closure.cache_clear()


def _double(x: int) -> int:
    return 2 * x


def uses_helper(out: Path) -> Artefact:
    out.write_text(str(_double(2)))
    return Artefact(str(out))


def test_code_version_covers_same_module_helpers() -> None:
    sources, _ = stage_mod._function_parts(uses_helper)
    assert any("return 2 * x" in s for s in sources)
    assert code_version(uses_helper) != code_version(add_one)


def test_stage_arguments_must_be_keyable(tmp_path: Path) -> None:
    def bad(x: object, out: Path) -> Artefact:
        return Artefact(str(out))

    with pytest.raises(TypeError, match="cannot enter a cache key"):
        run_stage("bad", bad, object(), out=tmp_path / "x")


def test_a_stage_must_return_an_artefact(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not an Artefact"):
        run_stage("wrong", lambda out: str(out), out=tmp_path / "x")


def test_code_version_is_the_same_in_every_process() -> None:
    """Sets iterate in another order under another hash seed: the version must not."""
    import subprocess
    import sys

    code = (
        "from tasks.common.stage import code_version; from tasks.rlrf4rec import stages; "
        "print(code_version(stages.sample.stage_fn), code_version(stages.score.stage_fn))"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2, 3)
    }
    assert len(seen) == 1


def test_a_result_switch_in_the_environment_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.common.hardware import DTYPE_ENV
    from tasks.llm import bf16_backward, cpu_norm, dpo_packing, top_p, trl_cpu, vllm_engine
    from tasks.rlrf4rec.encode import ENCODER_DTYPE_ENV

    # every module's switch is one the keys follow
    switches = {DTYPE_ENV, top_p.ENV, trl_cpu.ENV, vllm_engine.KV_ENV, ENCODER_DTYPE_ENV}
    switches |= {cpu_norm.ENV}
    switches |= {dpo_packing.ENV, dpo_packing.ATTENTION_ENV, bf16_backward.ENV}
    assert switches == set(stage_mod.RESULT_ENV)
    for var in stage_mod.RESULT_ENV:
        monkeypatch.delenv(var, raising=False)
    run_stage("numbers", write_numbers, out=tmp_path / "a.txt", cfg=Cfg())
    monkeypatch.setenv(top_p.ENV, "sort")
    switched = run_stage("numbers", write_numbers, out=tmp_path / "a.txt", cfg=Cfg())
    monkeypatch.setenv("UNRELATED_VARIABLE", "1")
    again = run_stage("numbers", write_numbers, out=tmp_path / "a.txt", cfg=Cfg())
    assert CALLS == ["write", "write"] and not switched.cached and again.cached


# --------------------------------------------------------------------------- why, and names


def test_a_run_says_why_it_was_not_served(tmp_path: Path) -> None:
    """The reason a resumed stage ran again, kept with it (the report says it), and the seconds
    a served one was made in."""
    out = tmp_path / "a.txt"
    assert run_stage("numbers", write_numbers, out=out, cfg=Cfg()).why == "not made before"
    served = run_stage("numbers", write_numbers, out=out, cfg=Cfg())
    assert served.cached and served.why == "not made before" and served.seconds >= 0
    other = run_stage("numbers", write_numbers, out=out, cfg=Cfg(scale=3), n=4)
    assert other.why == "cfg.scale 2 -> 3; n 3 -> 4"
    down = run_stage("add", add_one, other, out=tmp_path / "b.txt")
    up = run_stage("numbers", write_numbers, out=out, cfg=Cfg(scale=5), n=4)
    assert run_stage("add", add_one, up, out=tmp_path / "b.txt").why == "input source changed"
    assert down.why == "not made before"
    out.write_text("edited")
    again = run_stage("numbers", write_numbers, out=out, cfg=Cfg(scale=5), n=4)
    assert again.why == "its outputs were changed or deleted"


def test_task_run_names_say_what_the_stage_writes(tmp_path: Path) -> None:
    from tasks.common.stage import task_run_label

    run = tmp_path / "quick-ml-100k"
    (run / "round_01").mkdir(parents=True)
    (run / ".lock").write_text("1")
    assert task_run_label("sample", run / "round_01" / "samples.parquet") == (
        "sample round 1 samples"
    )
    seed = run / "eval" / "dlcm" / "kar" / "seed1"
    assert task_run_label("train-reranker", seed) == "train-reranker eval dlcm kar seed 1"
    assert task_run_label("dpo", run / "round_02" / "dpo") == "dpo round 2"
    assert task_run_label("sample", None) == "sample"
    assert task_run_label("y", Path("/nonexistent/abc/out.json")) == "y abc out"  # no run


def test_a_stage_run_before_the_flow_is_served_to_it_and_listed_as_run(tmp_path: Path) -> None:
    """The command line prepares the data before Prefect starts (``run_outside_prefect``): the
    flow's own call is served from the manifest without running again, and the start's ledger
    lists it as run in this start, not as made by an earlier one."""
    from tasks.common.stage import run_outside_prefect, stage, stage_ledger

    numbers = stage("numbers")(write_numbers)
    out = tmp_path / "a.txt"
    first = run_outside_prefect(numbers, out=out, cfg=Cfg())
    with stage_ledger() as seen:
        served = run_stage("numbers", write_numbers, out=out, cfg=Cfg())
        run_stage("numbers", write_numbers, out=out, cfg=Cfg())
    assert CALLS == ["write"] and not first.cached and served.cached
    assert served.fingerprint == first.fingerprint
    assert [(e["cached"], e["why"]) for e in seen] == [
        (False, "not made before; before the flow started"),
        (True, None),  # a second serving is a serving
    ]


FAIL_AT: list[int] = []  # the piece a counted_pieces run stops at (not in its key)


def counted_pieces(out: Path, pieces: int) -> Artefact:
    """Writes ``pieces`` numbers, one piece at a time, keeping finished pieces in partial_dir."""
    folder = stage_mod.partial_dir()
    values = []
    for i in range(pieces):
        piece = folder / f"{i}.txt"
        if not piece.exists():
            if i in FAIL_AT:
                raise RuntimeError(f"stopped at piece {i}")
            CALLS.append(f"piece {i}")
            piece.write_text(str(10 * i))
        values.append(piece.read_text())
    out.write_text(",".join(values))
    return Artefact(str(out))


def test_partial_work_survives_a_failed_run_for_the_same_key_only(tmp_path: Path) -> None:
    out = tmp_path / "n.txt"
    FAIL_AT[:] = [2]
    with pytest.raises(RuntimeError, match="piece 2"):
        run_stage("pieces", counted_pieces, out=out, pieces=4)
    assert CALLS == ["piece 0", "piece 1"]
    # another key (pieces=5) starts from nothing and drops the first key's pieces
    CALLS.clear()
    with pytest.raises(RuntimeError, match="piece 2"):
        run_stage("pieces", counted_pieces, out=out, pieces=5)
    assert CALLS == ["piece 0", "piece 1"]
    assert len(list((tmp_path / ".n.txt.partial").iterdir())) == 1
    # the same key again resumes: only the missing pieces are made
    CALLS.clear()
    FAIL_AT[:] = []
    run_stage("pieces", counted_pieces, out=out, pieces=5)
    assert CALLS == ["piece 2", "piece 3", "piece 4"]
    assert out.read_text() == "0,10,20,30,40"
    assert not (tmp_path / ".n.txt.partial").exists()
    with pytest.raises(RuntimeError, match="only available inside a running stage"):
        stage_mod.partial_dir()
