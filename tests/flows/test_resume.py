"""Resume is always right: the real flow on real MovieLens users and a tiny LLM, run again after
each kind of change; what ran again is read off the stage manifests it rewrote."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.common import stage as stage_mod

ROUND0 = {
    "data",
    "prompts.parquet",
    "item_vectors.parquet",
    "round_00/samples/shard00.parquet",
    "round_00/samples.parquet",
    "round_00/vectors.parquet",
    "reward_model",
}
ROUND1 = {
    "round_01/samples/shard00.parquet",
    "round_01/samples.parquet",
    "round_01/vectors.parquet",
    "round_01/scored.parquet",
    "round_01/pairs.parquet",
    "round_01/dpo",
    "round_01/knowledge/samples/shard00.parquet",
    "round_01/knowledge/samples.parquet",
    "round_01/knowledge/vectors.parquet",
    "eval/dlcm/RLRF4Rec/seed1/model",
    "eval/dlcm/RLRF4Rec/seed1/metrics.json",
}
FIXED_ROWS = {f"eval/dlcm/{row}/seed1/{part}" for row in ("base", "KAR") for part in
              ("model", "metrics.json")}  # fmt: skip


def manifests(run: Path) -> dict[str, int]:
    """``{stage output relative to the run: manifest mtime}`` of every stage of the run."""
    out = {}
    for m in run.rglob(".*.stage.json"):
        name = m.name[1 : -len(".stage.json")]
        out[str((m.parent / name).relative_to(run))] = m.stat().st_mtime_ns
    return out


def rerun(params: dict, **changes) -> set[str]:
    """Run the flow again with ``changes``; the stage outputs it recomputed."""
    from flows.iterate import iterate

    run = Path(params["runs_dir"]) / params["run_name"]
    before = manifests(run)
    iterate(**{**params, **changes})
    after = manifests(run)
    return {k for k, v in after.items() if before.get(k) != v}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llm_path: str, prefect_harness, one_torch_thread) -> dict:
    root = tmp_path_factory.mktemp("resume")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    params = {
        "run_name": "resume",
        "runs_dir": str(root / "runs"),
        "max_users": 30,
        "policy_model": tiny_llm_path,
        "rounds": 1,
        "n_samples": 3,
        "max_new_tokens": 16,
        "top_p": 1.0,  # see tests/conftest.py NO_TOP_P
        "backend": "transformers",
        "backbones": ["dlcm"],
        "seeds": [1],
        "reranker_epochs": 2,
        "dpo_max_steps": 1,
        "experiment": "tiny-resume",
    }
    from flows.iterate import iterate

    iterate(**params)
    return {"params": params, "dir": root / "runs" / "resume"}


def test_every_stage_writes_a_manifest(run) -> None:
    assert ROUND0 | ROUND1 | FIXED_ROWS <= set(manifests(run["dir"]))


def test_same_parameters_recompute_nothing(run) -> None:
    assert rerun(run["params"]) == set()


# 27 s and 41 s on a 2-core AMD EPYC: with them the default suite ran 603-653 s, past 10 minutes.
# The stage-level tests (tests/tasks/common/test_stage.py) keep a changed parameter and a
# changed code version in the default suite.
@pytest.mark.slow
def test_a_sampling_parameter_recomputes_sampling_and_what_follows(run) -> None:
    # n_samples is read by round 1's sampling only (round 0 and the knowledge passes take 1).
    changed = rerun(run["params"], n_samples=2)
    assert changed >= {
        "round_01/samples/shard00.parquet",
        "round_01/samples.parquet",
        "round_01/vectors.parquet",
        "round_01/scored.parquet",
        "round_01/pairs.parquet",
    }
    assert not changed & (ROUND0 | FIXED_ROWS)
    assert rerun(run["params"], n_samples=2) == set()
    rerun(run["params"])  # back to the fixture's settings for the tests that follow


@pytest.mark.slow
def test_a_changed_pairing_code_version_recomputes_pairing_and_what_follows(
    run, monkeypatch
) -> None:
    original = stage_mod._module_source
    edited = {"tasks.pairing"}
    monkeypatch.setattr(
        stage_mod, "_module_source", lambda n: original(n) + ("\n# edit\n" if n in edited else "")
    )
    stage_mod._module_closure.cache_clear()
    try:
        changed = rerun(run["params"])
    finally:
        stage_mod._module_closure.cache_clear()
    assert "round_01/pairs.parquet" in changed
    assert "round_01/dpo" in changed or _dpo_skipped(run["dir"])
    assert not changed & (ROUND0 | FIXED_ROWS | {"round_01/scored.parquet"})
    monkeypatch.undo()
    # The code as it was: pairing (and what follows) runs again, and nothing before it.
    restored = rerun(run["params"])
    assert "round_01/pairs.parquet" in restored and "round_01/scored.parquet" not in restored


def test_a_deleted_artefact_is_recomputed(run) -> None:
    scored = run["dir"] / "round_01" / "scored.parquet"
    before = scored.read_bytes()
    scored.unlink()
    changed = rerun(run["params"])
    assert "round_01/scored.parquet" in changed
    assert scored.read_bytes() == before
    # The same bytes again: what reads it is still valid and is not recomputed.
    assert "round_01/pairs.parquet" not in changed


def test_an_edited_artefact_is_recomputed_and_its_readers_stay_valid(run) -> None:
    import polars as pl

    vectors = run["dir"] / "round_00" / "vectors.parquet"
    frame = pl.read_parquet(vectors)
    frame.with_columns(pl.col("vector").list.eval(pl.element() * 0)).write_parquet(vectors)
    changed = rerun(run["params"])
    # Recomputed, it is byte-identical to what the stages downstream were built on.
    assert "round_00/vectors.parquet" in changed
    assert pl.read_parquet(vectors).equals(frame)
    assert not changed & {"reward_model", "round_01/scored.parquet"}


def test_preparing_data_from_outside_takes_the_run_lock(run, capsys) -> None:
    from tasks.common.runlock import run_lock
    from tasks.data.prepare import main

    users = run["dir"] / "data" / "users.parquet"
    before = users.stat().st_mtime_ns
    with run_lock(run["dir"]):
        code = main(["prepare", "--out", str(run["dir"]), "--max-users", "10"])
    assert code == 1 and "in use by another run" in capsys.readouterr().err
    assert users.stat().st_mtime_ns == before


def test_data_replaced_from_outside_is_put_back(run) -> None:
    """Data prepared into the run by hand (other users) is an edited artefact: the flow
    prepares its own again and everything that read it stays valid."""
    from tasks.data.prepare import main

    users = run["dir"] / "data" / "users.parquet"
    before = users.read_bytes()
    assert main(["prepare", "--out", str(run["dir"]), "--max-users", "10"]) == 0
    assert users.read_bytes() != before
    changed = rerun(run["params"])
    assert changed == {"data"} and users.read_bytes() == before


def _dpo_skipped(run_dir: Path) -> bool:
    import json

    m = json.loads((run_dir / "round_01" / ".dpo.stage.json").read_text())
    return m["result"]["skipped"] is not None
