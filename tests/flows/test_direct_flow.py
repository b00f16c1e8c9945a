"""The second pipeline's stages and flow: pairing, rewards, report, parameters, a CPU run."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
from pydantic import ValidationError

import tasks.direct.stages as stages
from flows.common import RunLockedError, parse_params, run_lock
from flows.direct import DESCRIPTION, DirectParams, StageConfigs, main
from tasks.direct.stages import (
    NDCGReward,
    preference_pairs,
    render_report,
    score_answers,
    sft_examples,
    summarise,
)
from tasks.direct.title_mapping import Catalogue, parse_answer

ITEMS = pl.DataFrame(
    {
        "item_id": [1, 2, 3, 4, 5, 6, 7],
        "title": [
            "Jaws (1975)",
            "Alien (1979)",
            "Psycho (1960)",
            "American President, The (1995)",
            "Heat (1995)",
            "Fargo (1996)",
            "Clerks (1994)",
        ],
    }
)


PROSE = "I am sorry, but I cannot recommend any movies because I do not know enough about you."


def _windows() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "window_id": [0, 1],
            "user_id": [10, 11],
            "prompt": ["p0", "p1"],
            "ground_truth_item_ids": [[1, 4], [5]],
            "ground_truth_titles": [["Jaws (1975)", "American President, The (1995)"], ["Heat"]],
            "context_item_ids": [[7], [6]],
        }
    )


def _scored(texts_scores: dict[int, list[tuple[str, float]]]) -> pl.DataFrame:
    rows = [
        {"window_id": w, "sample_idx": i, "text": t, "ndcg": s}
        for w, answers in texts_scores.items()
        for i, (t, s) in enumerate(answers)
    ]
    return pl.DataFrame(rows)


# --------------------------------------------------------------------------- pure stage parts


def test_score_answers_and_reward():
    cat = Catalogue.from_items(ITEMS)
    samples = pl.DataFrame(
        {
            "window_id": [0, 0, 1],
            "sample_idx": [0, 1, 0],
            "text": ["['The American President', 'Jaws']", PROSE, "1. Fargo\n2. Heat"],
        }
    )
    scored, summary = score_answers(samples, _windows(), cat)
    assert scored["ndcg"].to_list() == pytest.approx([1.0, 0.0, 1 / math.log2(3)])
    assert scored["format"].to_list() == ["list", "failed", "numbered"]
    assert scored["item_ids"].to_list()[0] == [4, 1]
    assert summary["parse_failures"] == 1 and summary["titles_parsed"] == 4
    assert summary["context_hits"] == 1  # Fargo is in user 11's window
    reward = NDCGReward(cat)
    extra = {"ground_truth_item_ids": [[1, 4], [1, 4]], "context_item_ids": [[7], [7]]}
    values = reward(["p", "p"], ["['Jaws', 'Alien']", [{"role": "assistant", "content": "x"}]],
                    extra)  # fmt: skip
    assert values[0] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert values[1] == 0.0 or values[1] < 1.0


def test_preference_pairs_all_and_best_worst():
    scored = _scored(
        {
            0: [("a", 0.5), ("b", 0.0), ("c", 0.5), ("d", 1.0)],
            1: [("x", 0.0), ("x", 0.0), ("y", 0.0)],  # all equal: no pair
        }
    )
    all_pairs = preference_pairs(scored, _windows(), "all_pairs")
    # 6 pairs of 4 answers; (a, c) tie -> 5 pairs; chosen always the higher
    assert all_pairs.height == 5
    assert set(zip(all_pairs["chosen"], all_pairs["rejected"], strict=True)) == {
        ("a", "b"), ("c", "b"), ("d", "a"), ("d", "b"), ("d", "c"),
    }  # fmt: skip
    assert (all_pairs["chosen_score"] > all_pairs["rejected_score"]).all()
    assert all_pairs["prompt"].unique().to_list() == ["p0"]
    bw = preference_pairs(scored, _windows(), "best_worst")
    assert bw.select("chosen", "rejected").rows() == [("d", "b")]
    margin = preference_pairs(scored, _windows(), "all_pairs", min_margin=0.5)
    assert set(margin["chosen"]) == {"d"} and margin.height == 1  # only d vs b (gap 1.0)
    capped = preference_pairs(scored, _windows(), "all_pairs", max_pairs_per_prompt=2)
    assert capped.height == 2 and capped["chosen"].to_list()[0] == "d"
    with pytest.raises(ValueError, match="pairing"):
        preference_pairs(scored, _windows(), "random")


def test_sft_examples_keep_titles_whole():
    ex = sft_examples(_windows())
    assert ex.columns == ["prompt", "completion"]
    assert parse_answer(ex["completion"][0]).titles == [
        "Jaws (1975)",
        "American President, The (1995)",
    ]


def test_report_layout():
    per_seed = {
        "base": {
            0: {
                "ndcg@5": 0.01,
                "precision@5": 0.02,
                "recall@5": 0.02,
                "mapped_title_rate": 0.5,
                "parse_failure_rate": 0.1,
            }
        },  # fmt: skip
        "sft": {0: {"ndcg@5": 0.02}, 1: {"ndcg@5": 0.04}},
        "popular": {0: {"ndcg@5": 0.05, "precision@5": 0.05, "recall@5": 0.05}},
    }
    table = summarise(per_seed)
    assert table["sft"]["ndcg@5"]["mean"] == pytest.approx(0.03)
    assert table["sft"]["ndcg@5"]["ci95"] == pytest.approx(12.706 * 0.01414214 / math.sqrt(2))
    text = render_report({"dataset": "ml-100k", "policy": "m", "profile": "quick",
                          "seeds": [0, 1], "test_windows": 3, "table": table})  # fmt: skip
    assert "| Base | 1.000 ± 0.000 | 2.000 ± 0.000 | 2.000 ± 0.000 | 50.000" in text
    assert "| SFT | 3.000 ± 12.706 |" in text and "| 1.687 |" in text
    assert "| Most popular | 5.000" in text and "n/a" in text


# --------------------------------------------------------------------------- parameters


def test_help_lists_the_parameters(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--profile {quick,paper}", "--max-eval-users", "--pairing", "--score-cutoff",
                 "--stages", "--zip-table"):  # fmt: skip
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
    with pytest.raises(ValidationError, match="stage"):
        DirectParams(stages=["sft", "sft"])


# --------------------------------------------------------------------------- the flow on CPU


def _always_pairs(real):
    """The tiny random model never hits the ground truth: pair its first two distinct answers."""

    def wrapped(scored, windows, mode="all_pairs", min_margin=0.0, max_pairs_per_prompt=None):
        pairs = real(scored, windows, mode, min_margin, max_pairs_per_prompt)
        if pairs.height:
            return pairs
        bumped = scored.with_columns(
            pl.when(pl.col("sample_idx") == 0).then(1.0).otherwise(pl.col("reward")).alias("reward")
        )
        return real(bumped, windows, "best_worst", 0.0, 1)

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
    monkeypatch.setattr(stages, "preference_pairs", _always_pairs(stages.preference_pairs))
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


def test_reward_model_on_tiny_llm(tiny_llm_path, tmp_path):
    """The RLHF row's reward model: one RewardTrainer step, then it scores answers."""
    pairs = pl.DataFrame(
        {
            "prompt": ["Recommend five movies.", "Five films, please."],
            "chosen": ["['Jaws (1975)', 'Alien (1979)']", "['Heat (1995)']"],
            "rejected": ["I cannot.", "no"],
        }
    )
    cfg = stages.RewardModelConfig(max_steps=1)
    out = stages.train_reward_model(tiny_llm_path, pairs, tmp_path / "rm", cfg)
    assert out["metrics"]["steps"] == 1 and (tmp_path / "rm" / "adapter").is_dir()
    score = stages.RewardModelScore(tiny_llm_path, out["adapter_dir"])
    values = score(["p", "p", "p"], ["['Jaws']", [{"role": "assistant", "content": "x"}], ""], {})
    assert len(values) == 3 and all(math.isfinite(v) for v in values)


@pytest.mark.slow
def test_flow_all_stages_with_rlhf(
    prefect_harness, tiny_llm_path, ml100k_dir, tmp_path, monkeypatch
):
    """Every stage including RLHF (reward model + online RL on its score)."""
    from flows.direct import direct_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(stages, "preference_pairs", _always_pairs(stages.preference_pairs))
    params = _tiny_params(tmp_path, ml100k_dir, tiny_llm_path, ["sft", "dpo", "rl", "rlhf"])
    direct_flow(**params)
    run = tmp_path / "runs" / "tiny"
    assert "| RLHF (reward model) |" in (run / "report.md").read_text()
    seed = run / "direct" / "seed_0"
    assert (seed / "rlhf" / "reward_model" / "adapter" / "adapter_config.json").is_file()
    assert (seed / "rlhf" / "model" / "adapter" / "adapter_config.json").is_file()
