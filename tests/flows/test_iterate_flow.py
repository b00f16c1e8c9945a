"""End to end: the real Prefect flow on a tiny data set, a tiny LLM and a real MLflow store."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.conftest import write_grouplens

ITEM_1_ANSWER = "Toy Story is a 1995 computer-animated film about toys that come to life."


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_llm_path: str, prefect_harness):
    """Run the flow once: 60 real MovieLens-100K users, a tiny random LLM, N=3, 48 new tokens,
    one DPO step per round, 2 rounds, item knowledge from a file for two items. (A hand-made
    data set this small gives a reward model too weak to tell samples apart, so no pair would
    survive.)"""
    import os

    root = tmp_path_factory.mktemp("flow")
    knowledge = root / "item.klg.json"  # KAR's layout
    knowledge.write_text(json.dumps({"1": {"prompt": "Introduce ...", "ans": ITEM_1_ANSWER},
                                     "50": {"ans": "A space opera."}}))  # fmt: skip
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    params = {
        "run_name": "tiny",
        "runs_dir": str(root / "runs"),
        "max_users": 60,
        "policy_model": tiny_llm_path,
        "rounds": 2,
        "n_samples": 3,
        "max_new_tokens": 48,
        "top_p": 1.0,  # see tests/conftest.py NO_TOP_P
        "backend": "transformers",
        "backbones": ["dlcm"],
        "seeds": [1],
        "reranker_epochs": 6,
        "dpo_max_steps": 1,
        "experiment": "tiny-e2e",
        "item_knowledge": str(knowledge),
    }
    from flows.iterate import iterate

    t0 = time.perf_counter()
    first = iterate(**params)
    first_wall = time.perf_counter() - t0
    return {"root": root, "params": params, "result": first, "wall": first_wall}


def test_artefacts(tiny_run, encoder_path: str) -> None:
    run = Path(tiny_run["result"]["run_dir"])
    for rel in (
        "data/lists.parquet",
        "prompts.parquet",
        "round_00/samples.parquet",
        "round_00/vectors.parquet",
        "round_01/scored.parquet",
        "round_01/pairs.parquet",
        "round_02/pairs.parquet",
        "report.md",
        "results.json",
        "fig4_rounds.png",
    ):
        assert (run / rel).exists(), rel
    samples = pl.read_parquet(run / "round_01" / "samples.parquet")
    data_users = pl.read_parquet(run / "data" / "users.parquet")
    n_sampled = data_users.filter(pl.col("split").is_in(["train", "valid"])).height
    n_train = data_users.filter(pl.col("split") == "train").height
    assert samples.height == 3 * n_sampled  # validation users too: the held-out reward
    assert set(samples["sample_idx"]) == {0, 1, 2}
    pairs = pl.read_parquet(run / "round_01" / "pairs.parquet")
    assert (pairs["chosen_reward"] > pairs["rejected_reward"]).all()
    for r in (1, 2):  # a round with pairs trains an adapter; one without keeps the policy
        n_pairs = pl.read_parquet(run / f"round_0{r}" / "pairs.parquet").height
        trained = any((run / f"round_0{r}" / "dpo").rglob("adapter_config.json"))
        assert trained == (n_pairs > 0), r
    assert pairs.height > 0
    # the quick profile's 300-token prompts: the oldest history left out of the policy's
    # prompt, kept whole in the knowledge texts' prefix
    from tasks.rlrf4rec.prompts import count_prompt_tokens, instruction

    prompts = pl.read_parquet(run / "prompts.parquet")
    tokens = [count_prompt_tokens(tiny_run["params"]["policy_model"], p) for p in prompts["prompt"]]
    assert max(tokens) <= 300
    cut = prompts.filter(~pl.col("prompt").str.starts_with(pl.col("prefix")))
    assert cut.height > 0.5 * prompts.height
    full = cut["prefix"].str.len_chars() + len(". " + instruction("ml-100k"))
    assert (full > cut["prompt"].str.len_chars()).all()
    results = json.loads((run / "results.json").read_text())
    table = results["tables"]["table1"]["dlcm"]
    assert set(table) == {"base", "profile", "KAR", "RLRF4Rec"}
    assert 0.0 <= table["RLRF4Rec"]["ndcg@5"]["mean"] <= 1.0
    report = (run / "report.md").read_text()
    assert "Table I" in report and "| DLCM | RLRF4Rec |" in report
    # the held-out measures: validation users are sampled every round, never paired
    split = dict(data_users.select("user_id", "split").iter_rows())
    assert {split[u] for u in pairs["user_id"]} == {"train"}
    assert {split[u] for u in samples["user_id"]} == {"train", "valid"}
    heldout = pl.read_parquet(run / "heldout" / "scored.parquet")
    assert set(heldout["split"]) == {"valid"} and heldout.height == 3 * (n_sampled - n_train)
    learning = results["results"]["learning"]
    assert [r["policy"] for r in learning] == [0, 1, 2]
    n_valid = n_sampled - n_train
    assert all(r["heldout"]["users"] == n_valid for r in learning)
    for r in learning[1:]:
        assert r["heldout"]["vs_policy_0"]["n"] == n_valid
        assert r["drift"]["kl_texts"] == n_valid  # one own text per validation user
        if not (run / f"round_0{r['policy']}" / "dpo" / "adapter").exists():
            assert r["drift"]["kl_per_token"] == 0.0  # an untrained policy is its reference
    assert "## Learning" in report and (run / "learning.png").exists()
    # the reward diagnostics of round 1's samples: report, results.json, a second model
    diag = results["results"]["reward_diagnostics"]
    assert diag["samples"] == samples.height and diag["users"] == n_sampled
    ndcg = diag["columns"]["ndcg_at_5"]
    assert 0.0 <= ndcg["swapped"]["changed_share"] <= 1.0
    assert ndcg["reliability"]["pairs"] == 3 * n_sampled  # 3 pairs of samples a user
    assert {"swapped", "zeroed", "spread"} <= set(diag["columns"]["genre_share"])
    assert diag["knowledge_ablation"]["n"] == n_sampled - n_train
    assert (run / "reward_diagnostics" / "second_model" / "reward.json").is_file()
    assert "## Does the reward read the text?" in report and "genre share (diagnostic)" in report
    scored = pl.read_parquet(run / "round_01" / "scored.parquet")
    assert scored["genre_share"].drop_nulls().is_between(0.0, 1.0).all()
    # the item vectors of the knowledge rows: the file's answer alone for items 1 and 50
    from tasks.rlrf4rec.encode import encode_texts, frame_vectors

    items = pl.read_parquet(run / "item_vectors.parquet").filter(pl.col("item_id") == 1)
    want = encode_texts([ITEM_1_ANSWER], encoder_path)
    assert np.allclose(frame_vectors(items), want, atol=1e-5)
    n_items = pl.read_parquet(run / "data" / "items.parquet").height
    assert f"2 of {n_items} items from it" in report and "Encoder `" in report
    assert "Rerankers: `fast` settings (arch `default`" in report


def test_mlflow_metrics_per_round(tiny_run) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent_id = tiny_run["result"]["mlflow_run_id"]
    exp = client.get_experiment_by_name("tiny-e2e")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert {"round_00", "round_01", "round_02"} <= set(by_name)
    for name in ("round_01", "round_02"):
        metrics = by_name[name].data.metrics
        if metrics["pairs.pairs"] > 0:
            assert "dpo.loss" in metrics and metrics["dpo.skipped"] == 0
        for key in ("reward.ndcg_at_5_mean", "pairs.pairs", "generation.tokens_per_s",
                    "generation.mean_tokens"):  # fmt: skip
            assert key in metrics, (name, key)
        assert "dpo.skipped" in metrics, name
        assert any(k.startswith("seconds.") for k in metrics), name
    parent = client.get_run(parent_id)
    assert "dlcm.RLRF4Rec.ndcg_at_5" in parent.data.metrics
    # the learning figures, one step per policy
    for key in ("learning.heldout.reward", "learning.train.reward", "learning.text.distinct_2"):
        assert sorted(m.step for m in client.get_metric_history(parent_id, key)) == [0, 1, 2]
    for key in ("learning.drift.kl_per_token", "learning.heldout.vs_policy_0.diff"):
        assert sorted(m.step for m in client.get_metric_history(parent_id, key)) == [1, 2]
    assert parent.data.params["rounds"] == "2"
    for key in ("reward_diagnostics.columns.ndcg_at_5.swapped.changed_share",
                "reward_diagnostics.columns.ndcg_at_5.reliability.pair_agreement",
                "reward_diagnostics.knowledge_ablation.diff",
                "reward_diagnostics.seconds.total"):  # fmt: skip
        assert key in parent.data.metrics, key

    # the run's story: one key per stage and Fig. 4 with step = round, counts as parameters,
    # provenance tags, the data set as an input, the DPO curve per optimiser step
    def steps(key: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(parent_id, key))

    assert steps("seconds.dpo") == [1, 2] and steps("seconds.sample") == [0, 1, 2]
    assert not any(k.startswith(("seconds.round_", "data.")) for k in parent.data.metrics)
    assert steps("fig4.dlcm.ndcg_at_5") == [0, 2]  # round 0 (KAR) and the last round
    assert "data.splits.test.users" in parent.data.params
    assert {"git.commit", "host.cpu", "host.cpu_dtype", "backend", "prefect.flow_run_id",
            "run_dir"} <= set(parent.data.tags)  # fmt: skip
    assert [i.dataset.name for i in parent.inputs.dataset_inputs] == ["ml-100k"]
    for name in ("round_01", "round_02"):
        if by_name[name].data.metrics["pairs.pairs"] > 0:
            assert client.get_metric_history(by_name[name].info.run_id, "dpo_step.loss")
    report = Path(tiny_run["result"]["report"]).read_text()
    assert "Test set: " in report and "degenerate" in report


def test_second_run_is_cached(tiny_run) -> None:
    from flows.iterate import iterate

    run = Path(tiny_run["result"]["run_dir"])
    watched = [p for p in run.rglob("*.parquet")] + list(run.rglob("*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in watched}
    t0 = time.perf_counter()
    again = iterate(**tiny_run["params"])
    second = time.perf_counter() - t0
    after = {p: p.stat().st_mtime_ns for p in watched}
    assert before == after  # nothing recomputed
    assert second < tiny_run["wall"]
    # the stage seconds of a run are the ones it measured: a cached run spent ~0 in stages
    first = tiny_run["result"]
    assert first["stage_seconds"] <= first["wall_seconds"]
    assert again["stage_seconds"] <= again["wall_seconds"] and again["stage_seconds"] < 1.0


def test_second_writer_is_refused(tiny_run) -> None:
    from tasks.common.runlock import RunLockedError, run_lock

    run = Path(tiny_run["result"]["run_dir"])
    with run_lock(run), pytest.raises(RunLockedError, match="in use by another run"):
        with run_lock(run):
            pass


def test_lock_removes_what_a_killed_run_left(tiny_run) -> None:
    from tasks.common.runlock import run_lock

    run = Path(tiny_run["result"]["run_dir"])
    stale = run / "round_01" / ".dpo.k1ll3d.tmp"
    (stale / "adapter").mkdir(parents=True)
    kept = sorted(p for p in run.rglob("*") if p.is_file() and p.name != ".lock")
    with run_lock(run):
        assert not stale.exists()
    assert sorted(p for p in run.rglob("*") if p.is_file() and p.name != ".lock") == kept


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--rounds", "-1", "--rounds"),
        ("--n-samples", "1", "--n-samples"),
        ("--dataset", "ml-20m", "--dataset"),
        ("--backbones", "dlcm,gru", "--backbones"),
        ("--policy-model", "/no/such/model", "--policy-model"),
        ("--seed", "-1", "--seed"),
        ("--temperature", "inf", "--temperature"),
    ],
)
def test_invalid_parameters_refused(flag, value, message, capsys, tmp_path) -> None:
    from flows.iterate import main

    with pytest.raises(SystemExit) as exc:
        main([flag, value, "--runs-dir", str(tmp_path / "runs")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # 43 s on a 2-core AMD EPYC: the default suite ran past 10 minutes there
def test_flow_runs_on_local_ray(tmp_path: Path, tiny_llm_path: str, prefect_harness) -> None:
    """The same flow with the Ray task runner: sampling shards run as Ray tasks."""
    import os

    pytest.importorskip("prefect_ray")
    from flows.iterate import iterate

    data_dir = write_grouplens(tmp_path / "ml", n_users=14, n_items=50, per_user=20)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = iterate(
        run_name="ray", runs_dir=str(tmp_path / "runs"), data_dir=str(data_dir), max_users=0,
        policy_model=tiny_llm_path, rounds=1, n_samples=2, max_new_tokens=8,
        backend="transformers", backbones=["dlcm"], seeds=[1], reranker_epochs=1,
        dpo_max_steps=1, n_shards=2, task_runner="ray", experiment="tiny-ray",
    )  # fmt: skip
    run = Path(result["run_dir"])
    shards = sorted((run / "round_01" / "samples").glob("shard*.parquet"))
    assert len(shards) == 2
    assert (run / "report.md").exists()


@pytest.mark.slow  # 20 s on a 2-core AMD EPYC: the default suite ran past 10 minutes with it
def test_rounds_zero_measures_the_policy_without_dpo(
    tmp_path: Path, tiny_llm_path: str, prefect_harness
) -> None:
    """``--rounds 0``: round 0, one round's samples scored and paired but not trained on,
    the policy's held-out figures and the reward diagnostics; Table I without RLRF4Rec."""
    import os

    from flows.iterate import iterate

    data_dir = write_grouplens(tmp_path / "ml", n_users=14, n_items=50, per_user=20)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = iterate(
        run_name="measure", runs_dir=str(tmp_path / "runs"), data_dir=str(data_dir),
        max_users=0, policy_model=tiny_llm_path, rounds=0, n_samples=2, max_new_tokens=8,
        top_p=1.0, backend="transformers", backbones=["dlcm"], seeds=[1], reranker_epochs=1,
        experiment="tiny-measure",
    )  # fmt: skip
    run = Path(result["run_dir"])
    assert (run / "round_01" / "scored.parquet").is_file()
    assert (run / "round_01" / "pairs.parquet").is_file()
    assert not (run / "round_01" / "dpo").exists() and not (run / "heldout").exists()
    results = json.loads((run / "results.json").read_text())
    assert set(results["tables"]["table1"]["dlcm"]) == {"base", "profile", "KAR"}
    rounds = results["results"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and "dpo" not in rounds[1]
    learning = results["results"]["learning"]
    assert [r["policy"] for r in learning] == [0] and learning[0]["heldout"]["users"] > 0
    assert results["results"]["reward_diagnostics"]["samples"] == rounds[1]["generation"]["samples"]
    report = (run / "report.md").read_text()
    assert "| DLCM | KAR |" in report and "| DLCM | RLRF4Rec |" not in report
    assert "KAR-profile:ndcg@5" in report


def test_dpo_settings_reach_the_trainer_config() -> None:
    from flows.iterate import IterateParams, LoopConfig

    quick = LoopConfig.of(IterateParams().resolved())
    cfg = quick.dpo_for(2)
    assert cfg.max_steps == 2 and cfg.gradient_checkpointing is False and cfg.seed == 44
    on = IterateParams(dpo_gradient_checkpointing=True, dpo_settings="paper").resolved()
    cfg = LoopConfig.of(on).dpo_for(1)
    assert cfg.gradient_checkpointing is True and cfg.grad_accum == 8
    assert (cfg.lr, cfg.epochs, cfg.beta, cfg.lora_layers) == (5e-5, 3.0, 0.01, 0)
    strong = IterateParams(
        dpo_settings="paper", dpo_lr=5e-4, dpo_epochs=2, dpo_beta=0.1, dpo_lora_layers=15
    ).resolved()
    cfg = LoopConfig.of(strong).dpo_for(1)
    assert (cfg.lr, cfg.epochs, cfg.beta, cfg.lora_layers) == (5e-4, 2.0, 0.1, 15)
    assert cfg.grad_accum == 8  # the rest of the preset stays
    assert quick.dpo.lora_layers == 0 and quick.dpo.beta == 0.01  # unset: every layer, 0.01


def test_paper_profile_takes_kars_settings() -> None:
    """The paper profile: KAR's backbones, short last chunks and prompt texts; the others
    keep today's."""
    from flows.iterate import IterateParams, LoopConfig

    paper = LoopConfig.of(IterateParams(profile="paper").resolved())
    assert (paper.reranker.arch, paper.reranker.dropout, paper.reranker.mlp) == (
        "kar", 0.0, (200, 80)
    )  # fmt: skip
    assert paper.reward.arch == "kar" and paper.reranker_for("prm", 2).arch == "kar"
    assert paper.lists.keep_short_chunk and paper.prompt_style == "kar"
    quick = LoopConfig.of(IterateParams().resolved())
    assert (quick.reranker.arch, quick.reranker.dropout) == ("default", 0.1)
    assert not quick.lists.keep_short_chunk and quick.prompt_style == "default"


def test_knowledge_temperature_is_apart_from_sampling() -> None:
    """The one text per user: --temperature unless knowledge_temperature is set (0 = greedy);
    the N samples of a round keep --temperature."""
    from pydantic import ValidationError

    from flows.iterate import IterateParams, LoopConfig

    same = LoopConfig.of(IterateParams(temperature=0.7).resolved())
    assert same.knowledge_sampling_for(0) == same.sampling_for(0, 1)
    assert same.knowledge_sampling_for(2).temperature == 0.7
    greedy = LoopConfig.of(IterateParams(temperature=0.7, knowledge_temperature=0).resolved())
    know = greedy.knowledge_sampling_for(3)
    assert (know.temperature, know.n, know.seed) == (0.0, 1, 42 + 3000)
    assert greedy.sampling_for(3, 4).temperature == 0.7
    with pytest.raises(ValidationError, match="knowledge_temperature"):
        IterateParams(knowledge_temperature=-1)


def test_configs_are_built_at_parse_time(capsys, monkeypatch, tmp_path) -> None:
    """A preset value that only a stage's config rejects fails when the parameters are
    parsed, before any work."""
    import flows.iterate as module
    from flows.iterate import IterateParams, main

    bad = {**IterateParams.PROFILES["quick"], "max_new_tokens": 0}
    monkeypatch.setitem(IterateParams.PROFILES, "quick", bad)
    monkeypatch.setattr(module, "iterate", lambda **_: pytest.fail("the run was started"))
    with pytest.raises(SystemExit) as exc:
        main(["--runs-dir", str(tmp_path / "runs")])
    assert exc.value.code == 2
    assert "SamplingConfig.max_new_tokens" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_round_train_users_is_a_seeded_subset(tmp_path: Path) -> None:
    from flows.iterate import round_train_users
    from tasks.common.stage import Artefact

    prompts = pl.DataFrame(
        {"user_id": list(range(1, 21)), "split": ["train"] * 15 + ["valid"] * 3 + ["test"] * 2}
    )
    prompts.write_parquet(tmp_path / "prompts.parquet")
    art = Artefact(str(tmp_path / "prompts.parquet"))
    picked = round_train_users(art, 5, seed=42)
    assert picked is not None and len(picked) == 5 and set(picked) <= set(range(1, 16))
    assert list(picked) == sorted(picked) and round_train_users(art, 5, seed=42) == picked
    assert round_train_users(art, 5, seed=1) != picked
    assert round_train_users(art, 0, seed=42) is None  # 0 = every train user
    assert round_train_users(art, 15, seed=42) is None


def test_profiles_belong_to_their_flow() -> None:
    from pydantic import ValidationError

    from flows.direct_params import DirectParams
    from flows.iterate import IterateParams, LoopConfig

    study = IterateParams(profile="study").resolved()
    assert (study.knowledge_encoding, study.reward_metric, study.max_users) == (
        "answer", "ndcg@5+auc", 0
    )  # fmt: skip
    quick = IterateParams().resolved()  # quick: the best reward design of docs/reward.md
    assert (quick.knowledge_encoding, quick.reward_contrastive) == ("answer", 1.0)
    assert LoopConfig.of(quick).reward.contrastive == 1.0 and study.reward_contrastive == 1.0
    paper = LoopConfig.of(IterateParams(profile="paper").resolved())
    assert (paper.encoding, paper.reward.contrastive) == ("kar", 0.0)  # the paper's reward
    direct = DirectParams(profile="study").resolved()  # the direct flow's own study profile
    assert (direct.max_train_users, direct.sft_epochs) == (0, 0.5)
    assert not hasattr(direct, "knowledge_encoding")
    with pytest.raises(ValidationError, match="profile"):
        DirectParams(profile="huge")


def test_loop_check_profile_is_a_diagnostic() -> None:
    """loop-check pairs by the genre reward, named a diagnostic in --help and the form."""
    from flows.iterate import IterateParams, LoopConfig

    check = IterateParams(profile="loop-check").resolved()
    cfg = LoopConfig.of(check)
    assert cfg.pairing.reward_col == "genre_share" and check.max_users == 400
    assert (cfg.dpo.lr, cfg.dpo.beta, cfg.dpo.epochs, cfg.rounds) == (5e-4, 0.1, 3.0, 3)
    assert cfg.reward_diagnostics and check.run_name == "loop-check-ml-100k"
    fields = IterateParams.model_fields
    assert "DIAGNOSTIC" in fields["reward_metric"].description
    assert "DIAGNOSTIC" in fields["profile"].description


def test_item_knowledge_by_profile_and_bad_paths_refused(tmp_path: Path) -> None:
    """paper: the LLM's answers (greedy, the profile's token budget); quick: titles; a path
    must be an existing parquet or JSON file."""
    from pydantic import ValidationError

    from flows.iterate import IterateParams, LoopConfig

    paper = LoopConfig.of(IterateParams(profile="paper").resolved())
    assert paper.item_knowledge == "llm"
    assert (paper.item_sampling.temperature, paper.item_sampling.max_new_tokens) == (0.0, 512)
    short = IterateParams(profile="paper", item_knowledge_tokens=128).resolved()
    assert LoopConfig.of(short).item_sampling.max_new_tokens == 128
    assert LoopConfig.of(IterateParams().resolved()).item_knowledge == "title"
    table = tmp_path / "k.parquet"
    table.write_bytes(b"")
    given = LoopConfig.of(IterateParams(item_knowledge=str(table)).resolved())
    assert given.item_knowledge == str(table.resolve())
    for bad in (str(tmp_path / "absent.json"), str(tmp_path), "bert"):
        with pytest.raises(ValidationError, match="expected title, llm or the path"):
            IterateParams(item_knowledge=bad)
