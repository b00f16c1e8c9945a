"""The second pipeline (You et al.) as a Prefect flow: ``python -m flows.direct``.

The LLM reads a user's profile and the liked and hated movies of a 10-rating window and answers
five titles; each title is mapped to the catalogue with rapidfuzz (WRatio); the answer is scored
with NDCG@5, Precision@5 and Recall@5 against the user's next five liked movies. Stages, each
evaluated on the test users with the same decoding settings: Base (no training) -> SFT on the
ground-truth titles -> DPO on pairs of sampled answers ranked by NDCG@5 -> online RL (GRPO or
RLOO) with the NDCG@5 of the answer as the reward, and RLHF with a reward model trained on the
preference pairs. A most-popular and an item-kNN recommender give reference rows. The result is
the paper's Table 1 (``runs/<run>/report.md``, ``results.json`` and MLflow).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows.common import (
    RESUME_NOTE,
    Tracker,
    ensure_run_uid,
    make_task_runner,
    params_flow,
    parse_params,
    run_lock,
)

log = logging.getLogger(__name__)

Stage = Literal["sft", "dpo", "rl", "rlhf"]
STAGE_ORDER = ("sft", "dpo", "rl", "rlhf")
LOGGED = ("metrics", "stats", "generation", "counts")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Values a profile gives to every parameter left unset (None).
PROFILES: dict[str, dict] = {
    "quick": {
        "seeds": [0],
        "max_train_users": 16,
        "max_pref_users": 8,
        "max_rl_users": 8,
        "max_eval_users": 32,
        "n_samples": 4,
        "max_new_tokens": 96,
        "stages": ["sft", "dpo", "rl"],
        "train_settings": "fast",
        "sft_max_steps": 0,
        "dpo_max_steps": 4,
        "rl_max_steps": 1,
        "rm_max_steps": 4,
        "format_bonus": 0.005,
    },
    "paper": {
        "seeds": [0, 1, 2],
        "max_train_users": 0,
        "max_pref_users": 0,
        "max_rl_users": 0,
        "max_eval_users": 0,
        "n_samples": 5,
        "max_new_tokens": 128,
        "stages": ["sft", "dpo", "rl", "rlhf"],
        "train_settings": "paper",
        "sft_max_steps": 0,
        "dpo_max_steps": 0,
        "rl_max_steps": 0,
        "rm_max_steps": 0,
        "format_bonus": 0.0,
    },
}


class DirectParams(BaseModel):
    """Parameters of one run of the second pipeline (the Prefect UI form and the command line)."""

    model_config = ConfigDict(extra="forbid")

    profile: Literal["quick", "paper"] = Field(
        "quick",
        description="quick: CPU, a few users, one short training per stage (minutes); paper: "
        "every user, the paper's training settings, 3 seeds. Fills every parameter left unset.",
    )
    run_name: str | None = Field(
        None,
        description="run folder under runs_dir (default 'direct-<profile>-<dataset>'); the same "
        "name with the same parameters resumes",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    )
    runs_dir: str = Field("runs", description="folder holding the run folders")
    dataset: Literal["ml-100k", "ml-1m"] = Field("ml-100k", description="data set")
    data_dir: str | None = Field(
        None, description="folder with the data set's files (optional for ml-100k)"
    )
    zip_table: str | None = Field(
        None,
        description="CSV with columns zip, city, state: the prompt then says 'from City, ST'; "
        "without it the ZIP code itself is shown",
    )
    seeds: list[int] | None = Field(
        None,
        description="one full run per seed (split, windows, sampling, training), e.g. 0,1,2; "
        "several give a mean with a 95 percent confidence interval (profile)",
    )
    policy_model: str = Field(
        "SmolLM2-135M-Instruct",
        description="policy LLM: the offline default, a local model folder or a HF id",
    )
    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="generation backend; auto = vLLM when it starts, else transformers"
    )
    context_size: int = Field(10, ge=1, description="ratings in the prompt window")
    k_min: int = Field(
        3, ge=1, description="a window needs at least this many liked or this many hated ratings"
    )
    liked_cap: int = Field(5, ge=0, description="most recent liked movies shown in the prompt")
    hated_cap: int = Field(5, ge=0, description="most recent hated movies shown in the prompt")
    min_ground_truth: int = Field(
        5, ge=1, le=5, description="a window needs this many liked movies after it (of 5)"
    )
    release_cutoff: Literal["dataset", "window"] = Field(
        "dataset",
        description="'released before' date: the data set's last rating day (the paper's "
        "'April 22nd, 1998') or the window's own cut-off day",
    )
    windows_per_train_user: int = Field(
        1, ge=1, description="distinct random windows per train user (more SFT/RL prompts)"
    )
    max_train_users: int | None = Field(
        None, ge=0, description="train users for SFT; 0 = all (profile)"
    )
    max_pref_users: int | None = Field(
        None, ge=0, description="train users sampled for DPO pairs and the reward model; 0 = all "
        "(profile)"
    )  # fmt: skip
    max_rl_users: int | None = Field(
        None, ge=0, description="train users whose prompts online RL uses; 0 = all (profile)"
    )
    max_eval_users: int | None = Field(
        None, ge=0, description="test users evaluated (same for every row); 0 = all (profile)"
    )
    stages: list[Stage] | None = Field(
        None, description="training stages after Base, e.g. sft,dpo,rl,rlhf (profile)"
    )
    max_new_tokens: int | None = Field(
        None, ge=8, description="token budget of an answer (profile)"
    )
    eval_temperature: float = Field(
        0.0, ge=0, description="decoding temperature of every evaluation; 0 = greedy"
    )
    n_samples: int | None = Field(
        None, ge=2, description="answers sampled per train prompt for the DPO pairs (profile)"
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the DPO samples")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling top-p")
    pairing: Literal["all_pairs", "best_worst"] = Field(
        "all_pairs",
        description="all_pairs: every pair of samples with different NDCG@5 (the paper); "
        "best_worst: one pair per prompt",
    )
    min_margin: float = Field(0.0, ge=0, description="drop pairs whose NDCG@5 gap is not above")
    format_bonus: float | None = Field(
        None,
        ge=0,
        le=0.005,
        description="added to NDCG@5 in the DPO pairing and the RL reward: this times the share "
        "of the 5 slots filled with distinct catalogue titles; breaks NDCG ties only (<= 0.005); "
        "0 = the paper (profile)",
    )
    max_pairs_per_prompt: int | None = Field(
        None, ge=1, description="keep at most this many pairs per prompt (largest gaps)"
    )
    score_cutoff: float | None = Field(
        None,
        ge=0,
        le=100,
        description="WRatio score below which a title counts as unmapped (none = the paper)",
    )
    exclude_context: bool = Field(
        False, description="map titles only onto movies outside the user's prompt window"
    )
    train_settings: Literal["fast", "paper"] | None = Field(
        None,
        description="LoRA trainers: fast CPU defaults or the paper's settings (profile)",
    )
    sft_max_steps: int | None = Field(None, ge=0, description="cap SFT steps; 0 = epochs")
    dpo_max_steps: int | None = Field(None, ge=0, description="cap DPO steps; 0 = epochs")
    dpo_beta: float = Field(0.1, gt=0, description="DPO beta (TRL's default; the paper gives none)")
    rl_algorithm: Literal["grpo", "rloo"] = Field("grpo", description="online RL algorithm")
    rl_max_steps: int | None = Field(None, ge=0, description="cap online-RL steps; 0 = epochs")
    rm_max_steps: int | None = Field(None, ge=0, description="cap reward-model steps; 0 = epochs")
    baseline_history: Literal["full", "context"] = Field(
        "full",
        description="what the reference recommenders know of a user: every rating before the "
        "window's end, or only the prompt's window",
    )
    knn_neighbours: int = Field(50, ge=1, description="item-kNN: neighbours kept per item")
    task_runner: Literal["threads", "ray"] = Field("threads", description="Prefect task runner")
    experiment: str = Field("rlrf4rec-direct", description="MLflow experiment name")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("give at least one seed >= 0, without repeats")
        return v

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("a stage is listed twice")
        return v

    @field_validator("policy_model", "data_dir", "zip_table")
    @classmethod
    def _existing_path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        looks_like_path = v.startswith(("/", "./", "../", "~")) or os.sep * 2 in v
        if looks_like_path and not Path(v).expanduser().exists():
            raise ValueError(f"path {v!r} does not exist")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DirectParams:
        if self.k_min > self.context_size:
            raise ValueError(f"k_min ({self.k_min}) must not exceed context_size "
                             f"({self.context_size})")  # fmt: skip
        if self.liked_cap == 0 and self.hated_cap == 0:
            raise ValueError("liked_cap and hated_cap are both 0: the prompt would be empty")
        return self

    def resolved(self) -> DirectParams:
        """A copy with every unset parameter filled from the profile."""
        fill = {k: v for k, v in PROFILES[self.profile].items() if getattr(self, k) is None}
        out = self.model_copy(update=fill)
        if out.run_name is None:
            out = out.model_copy(update={"run_name": f"direct-{out.profile}-{out.dataset}"})
        return out

    def run_dir(self) -> Path:
        base = Path(self.runs_dir)
        if not base.is_absolute():
            base = Path.cwd() / base
        return (base / (self.run_name or f"direct-{self.profile}-{self.dataset}")).resolve()

    # ---- the configs of the stages (plain dicts: they enter the tasks' cache keys)

    def window_cfg(self, seed: int) -> dict:
        return {
            "seed": seed,
            "context_size": self.context_size,
            "k_min": self.k_min,
            "liked_cap": self.liked_cap,
            "hated_cap": self.hated_cap,
            "min_ground_truth": self.min_ground_truth,
            "windows_per_train_user": self.windows_per_train_user,
            "release_cutoff": self.release_cutoff,
        }

    def mapping(self) -> dict:
        return {"score_cutoff": self.score_cutoff, "exclude_context": self.exclude_context}

    def baseline_cfg(self) -> dict:
        return {"history": self.baseline_history, "neighbours": self.knn_neighbours}

    def eval_sampling(self, seed: int) -> dict:
        return {
            "n": 1,
            "temperature": self.eval_temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens or 64,
            "seed": seed,
        }

    def pref_sampling(self, seed: int) -> dict:
        return {
            "n": self.n_samples or 4,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens or 64,
            "seed": seed + 1,
        }

    def sft_cfg(self, seed: int) -> dict:
        if self.train_settings == "paper":  # the paper: lr 5e-5, batch 8, 3 epochs, r 256
            cfg = {"lr": 5e-5, "batch_size": 8, "epochs": 3.0, "lora_r": 256, "lora_alpha": 128,
                   "lora_dropout": 0.05, "lora_target_modules": ALL_LINEAR}  # fmt: skip
        else:  # a few CPU steps: a large LoRA learning rate so that they move the policy
            cfg = {"lr": 1e-3, "batch_size": 4, "epochs": 1.0, "max_length": 512}
        return {**cfg, "seed": seed, "max_steps": self.sft_max_steps or -1}

    def dpo_cfg(self, seed: int) -> dict:
        if self.train_settings == "paper":  # the paper: batch 1, 2 epochs, r 16, alpha 16
            cfg = {"batch_size": 1, "epochs": 2.0, "lora_r": 16, "lora_alpha": 16,
                   "lora_dropout": 0.05, "lora_target_modules": ALL_LINEAR, "lr": 5e-5}  # fmt: skip
        else:
            cfg = {"lr": 5e-4, "batch_size": 2, "epochs": 1.0, "max_length": 512}
        # The reference policy is the one DPO starts from (the SFT policy).
        return {**cfg, "seed": seed, "beta": self.dpo_beta, "ref": "previous",
                "max_steps": self.dpo_max_steps or -1}  # fmt: skip

    def rl_cfg(self, seed: int) -> dict:
        if self.train_settings == "paper":  # the paper's PPO: lr 1e-5, batch 16, r 8, alpha 32
            cfg = {"lr": 1e-5, "batch_size": 4, "grad_accum": 1, "lora_r": 8, "lora_alpha": 32,
                   "lora_dropout": 0.1}  # fmt: skip
        else:
            cfg = {"lr": 1e-4, "batch_size": 2}
        # No KL term: the trainer's reference is the base model, and RL starts from SFT.
        return {**cfg, "seed": seed, "algorithm": self.rl_algorithm, "num_generations": 4,
                "max_completion_length": self.max_new_tokens or 64, "beta": 0.0,
                "temperature": self.temperature, "top_p": self.top_p,
                "max_steps": self.rl_max_steps or -1}  # fmt: skip

    def rm_cfg(self, seed: int) -> dict:
        return {"lr": 5e-5, "epochs": 1.0, "batch_size": 1 if self.train_settings == "paper" else 2,
                "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "seed": seed,
                "max_length": 512, "max_steps": self.rm_max_steps or -1}  # fmt: skip


DESCRIPTION = __doc__.split("\n\n")[0] + RESUME_NOTE


# --------------------------------------------------------------------------- the flow


def run_direct(params: DirectParams) -> dict:
    """Validate, lock the run folder, open the MLflow parent run and run the pipeline subflow."""
    from tasks.assets import policy_model

    p = params.resolved()
    policy_path = policy_model(p.policy_model)  # a missing model fails here, before any work
    run_dir = p.run_dir()
    with run_lock(run_dir):
        run_uid = ensure_run_uid(run_dir)
        tracker = Tracker(p.experiment)
        parent = tracker.start(p.run_name or run_dir.name, tags={"run_dir": str(run_dir)})
        tracker.params(parent, p.model_dump())
        pipeline = direct_pipeline.with_options(task_runner=make_task_runner(p.task_runner))
        try:
            result = pipeline(p, policy_path, str(run_dir), run_uid, parent)
        except BaseException:
            tracker.end(parent, "FAILED")
            raise
        tracker.end(parent)
    result["mlflow_run_id"] = parent
    return result


direct_flow = params_flow(
    DirectParams,
    run_direct,
    "rlrf4rec-direct",
    "The second pipeline: Base, SFT, DPO, online RL and RLHF rows of Table 1.",
)


def _users(n: int | None) -> int | None:
    return n or None


def _fp(*results: dict | None) -> str:
    """The content fingerprints of upstream results (a downstream task's cache input)."""
    return ":".join(r.get("fingerprint", "") for r in results if r)


@flow(name="rlrf4rec-direct-pipeline")
def direct_pipeline(
    p: DirectParams, policy: str, run: str, run_uid: str, parent_run_id: str
) -> dict:
    """The stages, in order, for every seed (see the module docstring)."""
    from tasks.direct_stages import (
        baselines_task,
        direct_data_task,
        dpo_task,
        evaluate_task,
        example_rows,
        load_direct,
        online_rl_task,
        preferences_task,
        reward_model_task,
        sft_task,
        summarise,
        write_report,
    )

    t_start = time.perf_counter()
    tracker = Tracker(p.experiment)
    root = Path(run) / "direct"
    stages = [s for s in STAGE_ORDER if s in (p.stages or [])]
    seeds = p.seeds or [0]
    per_seed: dict[str, dict[int, dict]] = {}
    timings: dict[str, float] = {}
    details: dict[str, dict] = {}
    notes: list[str] = []
    examples: list = []
    test_windows = 0

    def record(seed: int, stage: str, result: dict) -> None:
        """Time, MLflow child run and report details of one finished stage."""
        timings[f"seed{seed}.{stage}"] = float(result.get("seconds", 0.0))
        child = tracker.start(f"seed{seed}.{stage}", parent_run_id, tags={"stage": stage})
        logged = {k: v for k, v in result.items() if k in LOGGED and isinstance(v, dict)}
        tracker.metrics(child, {"seconds": result.get("seconds", 0.0), **logged})
        tracker.end(child)
        if seed == seeds[0]:
            details[stage] = _brief(result)

    def evaluate(seed: int, stage: str, data: dict, model: dict | None) -> str:
        """Evaluate one stage's policy on the test windows; return the answers' path."""
        ev = evaluate_task(
            data["path"], stage, policy, model["adapter_dir"] if model else None,
            p.eval_sampling(seed), p.backend, _users(p.max_eval_users), p.mapping(),
            str(root / f"seed_{seed}" / stage / "eval"),
            upstream=_fp(data, model), run_uid=run_uid,
        )  # fmt: skip
        record(seed, f"{stage}.eval", ev)
        per_seed.setdefault(stage, {})[seed] = ev["metrics"]
        tracker.metrics(parent_run_id, {f"seed{seed}.{stage}": ev["metrics"]})
        return ev["path"]

    for seed in seeds:
        sd = root / f"seed_{seed}"
        data = direct_data_task(
            p.dataset, p.data_dir, str(sd / "data"), p.window_cfg(seed), p.zip_table,
            run_uid=run_uid,
        )  # fmt: skip
        record(seed, "data", data)
        base_line = baselines_task(
            data["path"], str(sd / "baselines"), p.baseline_cfg(), _users(p.max_eval_users),
            upstream=_fp(data), run_uid=run_uid,
        )  # fmt: skip
        record(seed, "baselines", base_line)
        for name in ("popular", "item_knn"):
            per_seed.setdefault(name, {})[seed] = base_line["metrics"][name]
        answers: dict[str, str] = {}
        answers["base"] = evaluate(seed, "base", data, None)
        start: dict | None = None  # the policy the later stages start from (SFT's)
        if "sft" in stages:
            sft = sft_task(
                data["path"], policy, str(sd / "sft" / "model"), p.sft_cfg(seed),
                _users(p.max_train_users), upstream=_fp(data), run_uid=run_uid,
            )  # fmt: skip
            record(seed, "sft", sft)
            start = sft
            answers["sft"] = evaluate(seed, "sft", data, sft)
        start_adapter = start["adapter_dir"] if start else None
        prefs = None
        if "dpo" in stages or "rlhf" in stages:
            prefs = preferences_task(
                data["path"], policy, start_adapter, p.pref_sampling(seed), p.backend,
                _users(p.max_pref_users), p.mapping(), p.pairing, p.min_margin,
                p.max_pairs_per_prompt, str(sd / "preferences"), p.format_bonus or 0.0,
                upstream=_fp(data, start), run_uid=run_uid,
            )  # fmt: skip
            record(seed, "preferences", prefs)
        if "dpo" in stages and prefs is not None:
            dpo = dpo_task(
                policy, prefs["pairs_path"], str(sd / "dpo" / "model"), p.dpo_cfg(seed),
                start_adapter, upstream=_fp(prefs, start), run_uid=run_uid,
            )  # fmt: skip
            record(seed, "dpo", dpo)
            if dpo["adapter_dir"]:
                answers["dpo"] = evaluate(seed, "dpo", data, dpo)
            else:
                notes.append(f"seed {seed}: DPO skipped ({dpo['skipped']}).")
        if "rl" in stages:
            rl = online_rl_task(
                data["path"], policy, str(sd / "rl" / "model"), p.rl_cfg(seed), start_adapter,
                _users(p.max_rl_users), p.mapping(), format_bonus=p.format_bonus or 0.0,
                upstream=_fp(data, start), run_uid=run_uid,
            )  # fmt: skip
            record(seed, "rl", rl)
            answers["rl"] = evaluate(seed, "rl", data, rl)
        if "rlhf" in stages and prefs is not None:
            rm = reward_model_task(
                policy, prefs["pairs_path"], str(sd / "rlhf" / "reward_model"), p.rm_cfg(seed),
                upstream=_fp(prefs), run_uid=run_uid,
            )  # fmt: skip
            record(seed, "reward_model", rm)
            if rm["adapter_dir"]:
                rlhf = online_rl_task(
                    data["path"], policy, str(sd / "rlhf" / "model"), p.rl_cfg(seed),
                    start_adapter, _users(p.max_rl_users), p.mapping(),
                    reward_model_dir=rm["adapter_dir"], upstream=_fp(data, start, rm),
                    run_uid=run_uid,
                )  # fmt: skip
                record(seed, "rlhf", rlhf)
                answers["rlhf"] = evaluate(seed, "rlhf", data, rlhf)
            else:
                notes.append(f"seed {seed}: RLHF skipped ({rm['skipped']}).")
        if seed == seeds[0]:
            windows, _ = load_direct(data["path"])
            examples = example_rows(answers, windows)
            test_windows = per_seed["base"][seed].get("answers", 0)

    if p.format_bonus:
        notes.append(
            f"NDCG@5 ties in the DPO pairing and the RL reward are broken by a format bonus of "
            f"{p.format_bonus} x (distinct mapped titles / 5); it never outweighs an NDCG@5 "
            "difference. The paper profile has none."
        )
    table = summarise(per_seed)
    wall = time.perf_counter() - t_start
    results = {
        "dataset": p.dataset,
        "policy": p.policy_model,
        "profile": p.profile,
        "seeds": seeds,
        "test_windows": test_windows,
        "table": table,
        "per_seed": {row: {str(s): m for s, m in v.items()} for row, v in per_seed.items()},
        "stages": details,
        "timings": timings,
        "wall_seconds": wall,
        "notes": notes,
        "examples": examples,
        "params": p.model_dump(),
    }
    paths = write_report(results, Path(run))
    for row, metrics in table.items():
        tracker.metrics(parent_run_id, {f"{row}.{m}": s["mean"] for m, s in metrics.items()})
    tracker.metrics(parent_run_id, {"wall_seconds": wall})
    for path in paths.values():
        tracker.artifact(parent_run_id, path)
    return {"run_dir": run, **paths, "wall_seconds": wall}


BRIEF_KEYS = (
    "windows", "answers", "ndcg@5", "mapped_title_rate", "parse_failure_rate", "titles_parsed",
    "context_hits", "duplicates", "loss", "steps",
    "n_examples", "n_pairs", "n_prompts", "reward", "accuracy", "rewards/accuracies", "pairs",
    "prompts", "prompts_with_pairs", "prompts_all_zero", "mean_ndcg", "mean_best_ndcg",
    "backend", "generated_tokens", "tokens_per_s", "skipped",
)  # fmt: skip


def _brief(result: dict) -> dict:
    """The few reportable figures of a task's result (flat)."""
    flat: dict = {}
    for part in ("counts", "metrics", "stats", "generation"):
        value = result.get(part)
        if isinstance(value, dict):
            flat.update({k: v for k, v in value.items() if not isinstance(v, dict)})
    if result.get("skipped"):
        flat["skipped"] = result["skipped"]
    out = {k: flat[k] for k in BRIEF_KEYS if k in flat and flat[k] is not None}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    from tasks.assets import AssetError

    params, _ = parse_params(DirectParams, argv, "python -m flows.direct", DESCRIPTION)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = direct_flow(**params.model_dump(exclude_unset=True))
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(Path(result["report"]).read_text())
    print(f"run folder: {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
