"""The second pipeline's flow: parameters, typed configs and CPU runs of the stages.

The pure parts have their tests beside their modules: ``tests/tasks/direct/test_scoring.py``,
``tests/tasks/direct/test_report.py``, ``tests/tasks/test_pairing.py`` and
``tests/tasks/llm/test_reward_model.py``.
"""

from __future__ import annotations

import json
from dataclasses import replace

import polars as pl
import pytest
from pydantic import ValidationError

import tasks.direct.stages as stages
from flows.cli import parse_params
from flows.direct import DESCRIPTION, main
from flows.direct_params import DirectParams, StageConfigs
from tasks.common.runlock import RunLockedError, run_lock
from tasks.pairing import PairingConfig

# --------------------------------------------------------------------------- parameters


def test_help_lists_the_parameters(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--profile {quick,study,paper}", "--max-eval-users", "--pairing",
                 "--score-cutoff", "--stages", "--zip-table", "--no-exclude-context",
                 "--you-et-al-exact", "--rl-beta", "--rm-input {answer,prompt_answer}",
                 "--sft-epochs"):  # fmt: skip
        assert flag in out
    assert DESCRIPTION.split(":")[0] in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--k-min", "20"], "k_min (20) must not exceed context_size"),
        (["--top-p", "1.5"], "--top-p"),
        (["--seeds", "1,1"], "--seeds"),
        (["--policy-model", "/no/such/model"], "--policy-model"),
        (["--max-new-tokens", "2"], "--max-new-tokens"),
    ],
)
def test_invalid_parameters_are_refused(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        parse_params(DirectParams, argv + ["--runs-dir", str(tmp_path)], "prog", "d")
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work
    with pytest.raises(SystemExit):
        parse_params(DirectParams, ["--pairing", "worst"], "prog", "d")


def test_profiles_fill_unset_parameters():
    quick = DirectParams().resolved()
    assert quick.max_eval_users == 32 and quick.stages == ["sft", "dpo", "rl"]
    assert quick.run_name == "direct-quick-ml-100k"
    paper = DirectParams(profile="paper", max_eval_users=10).resolved()
    assert paper.seeds == [0, 1, 2] and paper.max_eval_users == 10
    assert paper.stages == ["sft", "dpo", "rl", "rlhf"]
    cfg = StageConfigs.of(paper, seed=0)
    assert cfg.sft.lora_r == 256 and cfg.dpo.ref == "previous" and cfg.dpo.epochs == 2.0
    assert StageConfigs.of(quick, seed=3).dpo.max_steps == 4
    quick_cfg = StageConfigs.of(quick, seed=0)
    assert quick_cfg.pairing == PairingConfig.direct("all_pairs", 0.0, None)
    assert quick_cfg.format_bonus == 0.005 and cfg.format_bonus == 0.0
    capped = DirectParams(pairing="mu_2sigma", min_margin=0.1, max_pairs_per_prompt=2).resolved()
    assert StageConfigs.of(capped, seed=0).pairing == PairingConfig(
        "mu_2sigma", 0.1, "reward", "window_id", 2
    )
    with pytest.raises(ValidationError, match="stage"):
        DirectParams(stages=["sft", "sft"])


def test_study_profile_and_you_et_al_settings():
    study = DirectParams(profile="study").resolved()
    cfg = StageConfigs.of(study, seed=0)
    assert study.max_train_users == 0 and study.max_eval_users == 0  # every train window
    assert study.stages == ["sft", "dpo", "rl", "rlhf"] and study.seeds == [0]
    assert cfg.sft.epochs == 0.5 and cfg.sft.max_steps == -1  # sized for an fp32-only CPU
    assert cfg.sft.lora_layers == cfg.dpo.lora_layers == cfg.rl.lora_layers == 15
    paper = StageConfigs.of(DirectParams(profile="paper").resolved(), seed=0)
    assert paper.sft.epochs == 3.0 and paper.sft.lora_layers == 0  # You et al.: every layer
    # DPO samples from the SFT policy as You et al.: n 5, temperature 0.6, top-p 0.9
    for c in (cfg, StageConfigs.of(DirectParams(profile="paper").resolved(), seed=0)):
        assert (c.pref_sampling.n, c.pref_sampling.temperature, c.pref_sampling.top_p) == (
            5, 0.6, 0.9
        )  # fmt: skip
        assert c.pairing.strategy == "all_pairs" and c.reward_model.rm_input == "answer"
    quick = StageConfigs.of(DirectParams().resolved(), seed=0)  # the smoke run as it was
    assert (quick.pref_sampling.n, quick.pref_sampling.temperature, quick.sft.epochs) == (
        4,
        1.0,
        1.0,
    )
    # exclusion is on by default and switched off on the command line
    assert cfg.mapping.exclude_context is True
    off, _ = parse_params(DirectParams, ["--no-exclude-context", "--rm-input", "prompt_answer",
                                         "--you-et-al-exact"], "prog", "d")  # fmt: skip
    off_cfg = StageConfigs.of(off.resolved(), seed=0)
    assert off_cfg.mapping.exclude_context is False
    assert off_cfg.reward_model.rm_input == "prompt_answer"
    assert off_cfg.windows.you_et_al_exact and off_cfg.windows.min_ground_truth == 1


def test_dpo_and_rl_take_the_sft_policy_as_reference(tmp_path):
    """DPO's reference and RL's KL reference are the SFT adapter the stages start from, and
    rl_beta reaches the arguments of the TRL config the RL trainer is built with (building the
    GRPOConfig itself is in tests/tasks/llm: importing TRL takes seconds)."""
    from flows.direct import stage_references
    from tasks.common.stage import Artefact, InputRef
    from tasks.llm.online_rl import check_reference, trl_config_kwargs
    from tasks.llm.policy import Policy

    sft_adapter = str(tmp_path / "sft" / "model" / "adapter")
    base = Policy(InputRef.of(tmp_path / "base-model"))
    after_sft = base.after(Artefact(sft_adapter))
    cfg = StageConfigs.of(DirectParams(profile="study").resolved(), seed=0)
    assert cfg.dpo.ref == "previous" and cfg.rl.beta == 0.04
    assert stage_references(cfg, after_sft) == {"dpo": sft_adapter, "rl": sft_adapter}
    assert stage_references(cfg, base) == {"dpo": "base", "rl": "base"}  # no SFT stage
    no_kl = StageConfigs.of(DirectParams(profile="study", rl_beta=0.0).resolved(), seed=0)
    assert stage_references(no_kl, after_sft)["rl"] is None
    for beta in (0.04, 0.2):
        rl = StageConfigs.of(DirectParams(profile="study", rl_beta=beta).resolved(), seed=0).rl
        args = trl_config_kwargs(rl, tmp_path / "trainer", "cpu")
        assert args["beta"] == beta and args["num_generations"] == 4
        assert args["temperature"] == 0.6 and args["use_cpu"] is True

    class Trained:  # what check_reference reads of a built trainer's model
        peft_config = {"default": None}

    with pytest.raises(RuntimeError, match="frozen copy"):
        check_reference(Trained(), sft_adapter, sft_adapter)
    Trained.peft_config = {"default": None, "ref": None}
    check_reference(Trained(), sft_adapter, sft_adapter)


# --------------------------------------------------------------------------- the flow on CPU


def _always_pairs(real):
    """The tiny random model never hits the ground truth: pair its first two distinct answers."""

    def wrapped(scored, windows, cfg):
        pairs, stats = real(scored, windows, cfg)
        if pairs.height:
            return pairs, stats
        bumped = scored.with_columns(
            pl.when(pl.col("sample_idx") == 0).then(1.0).otherwise(pl.col("reward")).alias("reward")
        )
        return real(bumped, windows, replace(cfg, strategy="best_worst", max_pairs_per_prompt=1))

    return wrapped


def _tiny_params(tmp_path, ml100k_dir, tiny_llm_path, stages_: list[str]) -> dict:
    return {
        "run_name": "tiny",
        "runs_dir": str(tmp_path / "runs"),
        "data_dir": str(ml100k_dir),
        "policy_model": tiny_llm_path,
        "backend": "transformers",
        "stages": stages_,
        "max_new_tokens": 12,
        "top_p": 1.0,  # see tests/conftest.py NO_TOP_P
        "n_samples": 2,
        "max_train_users": 2,
        "max_pref_users": 2,
        "max_rl_users": 2,
        "max_eval_users": 1,
        "sft_max_steps": 1,
        "dpo_max_steps": 1,
        "rl_max_steps": 1,
        "rm_max_steps": 1,
        "experiment": "direct-test",
    }


def test_flow_end_to_end_on_cpu(prefect_harness, tiny_llm_path, ml100k_dir, tmp_path, monkeypatch):
    """Base, SFT, DPO and RL, one step each, on the tiny data set; then resume and lock."""
    from mlflow.tracking import MlflowClient

    from flows.direct import direct_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(stages, "build_pairs", _always_pairs(stages.build_pairs))
    params = _tiny_params(tmp_path, ml100k_dir, tiny_llm_path, ["sft", "dpo", "rl"])
    result = direct_flow(**params)
    run = tmp_path / "runs" / "tiny"
    report = (run / "report.md").read_text()
    for row in ("| Base |", "| SFT |", "| DPO |", "| RL (NDCG@5 reward) |", "| Most popular |",
                "| Item-kNN |", "| 0.624 |", "## Time per stage"):  # fmt: skip
        assert row in report, row
    results = json.loads((run / "results.json").read_text())
    assert set(results["table"]) == {"base", "sft", "dpo", "rl", "popular", "item_knn"}
    assert results["table"]["base"]["parse_failure_rate"]["mean"] is not None
    assert set(results["timings"]) >= {"seed0.sft", "seed0.dpo", "seed0.rl", "seed0.rl.eval"}
    seed = run / "direct" / "seed_0"
    answers = pl.read_parquet(seed / "sft" / "eval" / "answers.parquet")
    assert answers.height == 1 and answers.schema["titles"] == pl.List(pl.Utf8)
    windows = pl.read_parquet(seed / "data" / "windows.parquet")
    assert windows.schema["ground_truth_titles"] == pl.List(pl.Utf8)
    assert (seed / "dpo" / "model" / "adapter" / "adapter_config.json").is_file()
    assert (seed / "rl" / "model" / "adapter" / "adapter_config.json").is_file()
    assert pl.read_parquet(seed / "preferences" / "pairs.parquet").height >= 1
    # MLflow: the parent run with the table, one child run per stage
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("direct-test")
    runs = client.search_runs([exp.experiment_id])
    parent = client.get_run(result["mlflow_run_id"])
    assert any(k.startswith("sft.ndcg") for k in parent.data.metrics)  # key cleaned by Tracker
    assert parent.data.params["profile"] == "quick"
    children = {r.info.run_name for r in runs if r.info.run_id != result["mlflow_run_id"]}
    assert {"seed0.sft", "seed0.dpo", "seed0.rl", "seed0.base.eval", "seed0.data"} <= children
    # the run's story: provenance tags, the data set as an input, per-step curves, counts as
    # parameters, the report as the flow run's Prefect artefact
    assert {"git.commit", "host.cpu", "host.cpu_dtype", "backend", "prefect.flow_run_id",
            "run_dir"} <= set(parent.data.tags)  # fmt: skip
    assert [i.dataset.name for i in parent.inputs.dataset_inputs] == ["ml-100k"]
    by_name = {r.info.run_name: r for r in runs}
    dpo_child = by_name["seed0.dpo"].info.run_id
    assert client.get_metric_history(dpo_child, "dpo_step.loss")
    assert by_name["seed0.data"].data.params and not any(
        k.startswith("counts.") for k in by_name["seed0.data"].data.metrics
    )
    from prefect.artifacts import Artifact

    artefact = Artifact.get("direct-tiny")
    assert artefact is not None and "The second pipeline" in artefact.data
    assert str(artefact.flow_run_id) == parent.data.tags["prefect.flow_run_id"]
    # Resumable: the same parameters again hit every task's cache (nothing retrained).
    weights = seed / "sft" / "model" / "adapter" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime
    again = direct_flow(**params)
    assert json.loads((run / "results.json").read_text())["table"] == results["table"]
    assert weights.stat().st_mtime == stamp
    assert again["wall_seconds"] < result["wall_seconds"]
    # A second process on the same run folder is refused.
    with run_lock(run), pytest.raises(RunLockedError):
        direct_flow(**params)


@pytest.mark.slow
def test_flow_all_stages_with_rlhf(
    prefect_harness, tiny_llm_path, ml100k_dir, tmp_path, monkeypatch
):
    """Every stage including RLHF (reward model + online RL on its score)."""
    from flows.direct import direct_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(stages, "build_pairs", _always_pairs(stages.build_pairs))
    params = _tiny_params(tmp_path, ml100k_dir, tiny_llm_path, ["sft", "dpo", "rl", "rlhf"])
    direct_flow(**params)
    run = tmp_path / "runs" / "tiny"
    assert "| RLHF (reward model) |" in (run / "report.md").read_text()
    seed = run / "direct" / "seed_0"
    assert (seed / "rlhf" / "reward_model" / "adapter" / "adapter_config.json").is_file()
    assert (seed / "rlhf" / "model" / "adapter" / "adapter_config.json").is_file()
