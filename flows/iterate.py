"""RLRF4Rec's Algorithm 1 as a Prefect flow: ``python -m flows.iterate``.

Round 0 writes zero-shot knowledge for every user and trains the reward reranker on it; each
round r = 1..R samples N texts per train user with policy r-1, encodes and scores them with the
frozen reward model, pairs best and worst, and trains policy r with LoRA-DPO. After the last
round every user's knowledge is regenerated with the final policy and the backbone rerankers
are trained and evaluated on the test users: Table I (base / KAR / RLRF4Rec), Table II and the
per-round curve (Fig. 4), in ``runs/<run>/report.md`` and MLflow.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, field_validator

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

Backbone = Literal["dlcm", "prm"]

# Values a profile gives to every parameter left unset (None).
PROFILES: dict[str, dict] = {
    "quick": {
        "max_users": 100,
        "rounds": 2,
        "n_samples": 4,
        "max_new_tokens": 96,
        "dpo_max_steps": 2,
        "backbones": ["dlcm", "prm"],
        "seeds": [1],
        "reranker_settings": "fast",
        "dpo_settings": "fast",
        "eval_each_round": False,
    },
    "paper": {
        "max_users": 0,
        "rounds": 3,
        "n_samples": 8,
        "max_new_tokens": 512,
        "backbones": ["dlcm", "prm"],
        "seeds": [1, 2, 3],
        "reranker_settings": "paper",
        "dpo_settings": "paper",
        "eval_each_round": True,
    },
}


class IterateParams(BaseModel):
    """Parameters of one RLRF4Rec run (the Prefect UI form and the command line)."""

    model_config = ConfigDict(extra="forbid")

    profile: Literal["quick", "paper"] = Field(
        "quick",
        description="quick: CPU, a subset of users, minutes; paper: all users, the paper's "
        "settings. Fills every parameter left unset.",
    )
    run_name: str | None = Field(
        None,
        description="run folder under runs_dir (default '<profile>-<dataset>'); the same name "
        "with the same parameters resumes",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    )
    runs_dir: str = Field("runs", description="folder holding the run folders")
    dataset: Literal["ml-100k", "ml-1m", "amazon-books"] = Field("ml-100k", description="data set")
    data_dir: str | None = Field(
        None, description="folder with the data set's files (optional for ml-100k)"
    )
    max_users: int | None = Field(
        None, ge=0, description="seeded random subset of users; 0 = all (profile)"
    )
    seed: int = Field(42, description="seed of the data split, negatives and sampling")
    policy_model: str = Field(
        "SmolLM2-135M-Instruct",
        description="policy LLM: the offline default, a local model folder or a HF id",
    )
    encoder: str = Field(
        "all-MiniLM-L6-v2",
        description="knowledge encoder: the offline default, a local folder or a HF id",
    )
    rounds: int | None = Field(None, ge=1, description="DPO rounds R (profile)")
    n_samples: int | None = Field(
        None, ge=2, description="N texts sampled per train user and round (profile)"
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling top-p")
    max_new_tokens: int | None = Field(
        None, ge=1, description="token budget of each answer (profile)"
    )
    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="generation backend; auto = vLLM when it starts, else transformers"
    )
    n_shards: int = Field(
        0, ge=0, description="sampling shards, one engine each; 0 = one per GPU (1 on CPU)"
    )
    reward_backbone: Backbone = Field("dlcm", description="backbone of the reward reranker")
    reward_metric: Literal["ndcg@5", "map@5"] = Field(
        "ndcg@5", description="per-sample reward used for pairing"
    )
    pairing: Literal["best_worst", "all_pairs", "mu_2sigma"] = Field(
        "best_worst",
        description="best_worst (the paper), all_pairs with a margin, or mu - 2 sigma rejected",
    )
    min_margin: float = Field(
        0.0, ge=0, description="drop pairs whose reward difference is below this"
    )
    backbones: list[Backbone] | None = Field(
        None, description="backbones of the final evaluation, e.g. dlcm,prm (profile)"
    )
    seeds: list[int] | None = Field(
        None, description="seeds of the final rerankers, e.g. 1,2,3 (profile)"
    )
    reranker_settings: Literal["fast", "paper"] | None = Field(
        None, description="reranker training: fast CPU default or the paper's (profile)"
    )
    reranker_epochs: int | None = Field(None, ge=1, description="override reranker epochs")
    dpo_settings: Literal["fast", "paper"] | None = Field(
        None, description="DPO: fast CPU default or the paper's (profile)"
    )
    dpo_beta: float = Field(0.01, gt=0, description="DPO beta (the paper: 0.01)")
    dpo_max_steps: int | None = Field(
        None, ge=1, description="cap DPO optimiser steps per round (profile; quick: 2)"
    )
    dpo_reference: Literal["base", "previous"] = Field(
        "base", description="DPO reference policy: the base model or the previous round's"
    )
    dpo_gradient_checkpointing: bool | None = Field(
        None,
        description="recompute activations in DPO's backward pass; unset: on GPU only (quick "
        "profile on CPU: peak 1.1 GB lower, DPO 26% slower)",
    )
    eval_each_round: bool | None = Field(
        None, description="evaluate every round's policy on test users (Fig. 4) (profile)"
    )
    task_runner: Literal["threads", "ray"] = Field(
        "threads", description="threads, or Ray (prefect-ray) with one GPU per sampling shard"
    )
    experiment: str = Field("rlrf4rec", description="MLflow experiment name")

    @field_validator("backbones")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("give at least one backbone (dlcm, prm)")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("give at least one seed, without repeats")
        return v

    @field_validator("policy_model", "encoder", "data_dir")
    @classmethod
    def _existing_path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        looks_like_path = v.startswith(("/", "./", "../", "~")) or os.sep * 2 in v
        if looks_like_path and not Path(v).expanduser().exists():
            raise ValueError(f"path {v!r} does not exist")
        return v

    def resolved(self) -> IterateParams:
        """A copy with every unset parameter filled from the profile."""
        fill = {k: v for k, v in PROFILES[self.profile].items() if getattr(self, k) is None}
        out = self.model_copy(update=fill)
        if out.run_name is None:
            out = out.model_copy(update={"run_name": f"{out.profile}-{out.dataset}"})
        return out

    def run_dir(self) -> Path:
        base = Path(self.runs_dir)
        if not base.is_absolute():
            base = Path.cwd() / base
        return (base / (self.run_name or f"{self.profile}-{self.dataset}")).resolve()


DESCRIPTION = __doc__.split("\n\n")[0] + RESUME_NOTE


# --------------------------------------------------------------------------- the flow


def run_iterate(params: IterateParams) -> dict:
    """Validate, lock the run folder, open the MLflow parent run and run the loop subflow."""
    from tasks.assets import encoder_model, policy_model

    p = params.resolved()
    # Resolve the models first: a missing model fails here, before any work.
    policy_path = policy_model(p.policy_model)
    encoder_path = encoder_model(p.encoder)
    run_dir = p.run_dir()
    with run_lock(run_dir):
        run_uid = ensure_run_uid(run_dir)
        tracker = Tracker(p.experiment)
        parent = tracker.start(p.run_name or run_dir.name, tags={"run_dir": str(run_dir)})
        tracker.params(parent, p.model_dump())
        loop = rlrf4rec_loop.with_options(task_runner=make_task_runner(p.task_runner))
        try:
            result = loop(p, policy_path, encoder_path, str(run_dir), run_uid, parent)
        except BaseException:
            tracker.end(parent, "FAILED")
            raise
        tracker.end(parent)
    result["mlflow_run_id"] = parent
    return result


iterate = params_flow(
    IterateParams,
    run_iterate,
    "rlrf4rec-iterate",
    "RLRF4Rec: R rounds of sample, score, pair and DPO; then Table I.",
    log_prints=True,
)


@flow(name="rlrf4rec-loop")
def rlrf4rec_loop(
    p: IterateParams,
    policy_path: str,
    encoder_path: str,
    run: str,
    run_uid: str,
    parent_run_id: str,
) -> dict:
    """The stages, in order (see the module docstring)."""
    from tasks.data import prepare_data_task
    from tasks.generate import available_gpus
    from tasks.loop import (
        dpo_task,
        encode_items_task,
        encode_task,
        pair_task,
        prompts_task,
        score_task,
        train_reward_task,
    )
    from tasks.report import write_report

    t_start = time.perf_counter()
    tracker = Tracker(p.experiment)
    R = Path(run)
    timings: dict[str, float] = {}
    gpus = available_gpus()
    n_shards = p.n_shards or max(1, len(gpus))

    data = prepare_data_task(
        p.dataset, run, p.data_dir, seed=p.seed, max_users=p.max_users or None, run_uid=run_uid
    )
    timings["prepare"] = data["seconds"]
    prompts = prompts_task(run, p.dataset, str(R / "prompts.parquet"), run_uid=run_uid)
    timings["prompts"] = prompts["seconds"]
    items = encode_items_task(run, str(R / "item_vectors.parquet"), encoder_path, run_uid=run_uid)
    timings["encode_items"] = items["seconds"]
    tracker.metrics(parent_run_id, {"data": data["counts"]})

    # ---- round 0: zero-shot knowledge for every user, reward model
    r0 = tracker.start("round_00", parent_run_id)
    knowledge0 = _knowledge(
        p,
        prompts["path"],
        policy_path,
        None,
        0,
        R / "round_00",
        encoder_path,
        n_shards,
        gpus,
        run_uid,
        timings,
        "round_00",
    )
    reward_model = train_reward_task(
        run,
        str(R / "reward_model"),
        _train_cfg(p, p.reward_backbone, p.seed),
        knowledge0["vectors"],
        items["path"],
        run_uid=run_uid,
    )
    timings["round_00.train_reward_model"] = reward_model["seconds"]
    tracker.metrics(
        r0, {"generation": knowledge0["generation"], "reward_model": reward_model["train"]}
    )
    tracker.metrics(r0, {f"seconds.{k}": v for k, v in timings.items() if k.startswith("round_00")})
    tracker.end(r0)
    rounds: list[dict] = [{"round": 0, "generation": knowledge0["generation"]}]
    round_knowledge = {0: knowledge0["vectors"]}

    # ---- rounds 1..R
    adapter: str | None = None
    policy_for_sampling, sampling_adapter = policy_path, None
    for r in range(1, p.rounds + 1):
        tag = f"round_{r:02d}"
        rd = R / tag
        child = tracker.start(tag, parent_run_id)
        samples = _sample(
            p,
            prompts["path"],
            ["train"],
            p.n_samples,
            policy_for_sampling,
            sampling_adapter,
            r,
            rd,
            n_shards,
            gpus,
            run_uid,
        )
        timings[f"{tag}.sample"] = samples["seconds"]
        vectors = encode_task(
            samples["path"],
            prompts["path"],
            str(rd / "vectors.parquet"),
            encoder_path,
            run_uid=run_uid,
        )
        timings[f"{tag}.encode"] = vectors["seconds"]
        scored = score_task(
            reward_model["model_dir"],
            run,
            vectors["path"],
            samples["path"],
            items["path"],
            str(rd / "scored.parquet"),
            run_uid=run_uid,
        )
        timings[f"{tag}.score"] = scored["seconds"]
        reward_col = p.reward_metric.replace("@", "_at_")
        pairs = pair_task(
            scored["path"],
            prompts["path"],
            str(rd / "pairs.parquet"),
            p.pairing,
            p.min_margin,
            reward_col,
            run_uid=run_uid,
        )
        timings[f"{tag}.pair"] = pairs["seconds"]
        dpo = dpo_task(
            policy_path,
            pairs["path"],
            str(rd / "dpo"),
            _dpo_cfg(p, r),
            init_adapter=adapter,
            run_uid=run_uid,
        )
        timings[f"{tag}.dpo"] = dpo["seconds"]
        if not dpo.get("skipped"):
            adapter = dpo["adapter_dir"]
            if dpo.get("merged_dir"):
                policy_for_sampling, sampling_adapter = dpo["merged_dir"], None
            else:
                policy_for_sampling, sampling_adapter = policy_path, adapter
        info = {
            "round": r,
            "generation": samples["stats"],
            "reward": scored["stats"],
            "pairs": pairs["stats"],
            "dpo": {**dpo.get("metrics", {}), "skipped": int(bool(dpo.get("skipped")))},
        }
        tracker.metrics(child, {k: v for k, v in info.items() if k != "round"}, step=r)
        tracker.metrics(child, {f"seconds.{k}": v for k, v in timings.items() if k.startswith(tag)})
        tracker.metrics(
            parent_run_id, {"reward_mean": scored["stats"][f"{reward_col}_mean"]}, step=r
        )
        tracker.artifact(child, pairs["path"])
        if adapter and not dpo.get("skipped"):
            tracker.artifact(child, adapter, "adapter")
        if p.eval_each_round or r == p.rounds:
            k = _knowledge(
                p,
                prompts["path"],
                policy_for_sampling,
                sampling_adapter,
                r,
                rd / "knowledge",
                encoder_path,
                n_shards,
                gpus,
                run_uid,
                timings,
                f"{tag}.knowledge",
            )
            round_knowledge[r] = k["vectors"]
        tracker.end(child)
        rounds.append(info)

    # ---- final evaluation: Table I rows per backbone and seed
    table1: dict = {}
    per_list: dict = {}
    final = round_knowledge[p.rounds]
    rows = {"base": None, "KAR": round_knowledge[0], "RLRF4Rec": final}
    for backbone in p.backbones or ["dlcm"]:
        for seed in p.seeds or [1]:
            for row, vec in rows.items():
                ev = _train_eval(
                    p,
                    run,
                    R / "eval" / backbone / row / f"seed{seed}",
                    backbone,
                    seed,
                    vec,
                    items["path"],
                    run_uid,
                    timings,
                )
                table1.setdefault(backbone, {}).setdefault(row, {})[str(seed)] = ev["metrics"]
                per_list.setdefault(backbone, {}).setdefault(row, {})[str(seed)] = ev["per_list"]
    # Fig. 4: test metrics of each evaluated round's policy (reward backbone, first seed).
    first_seed = (p.seeds or [1])[0]
    for info in rounds:
        r = info["round"]
        if r == 0:
            vec_metrics = table1.get(p.reward_backbone, {}).get("KAR", {}).get(str(first_seed))
        elif r == p.rounds:
            vec_metrics = table1.get(p.reward_backbone, {}).get("RLRF4Rec", {}).get(str(first_seed))
        elif r in round_knowledge:
            vec_metrics = _train_eval(
                p,
                run,
                R / "eval" / p.reward_backbone / f"round{r}" / f"seed{first_seed}",
                p.reward_backbone,
                first_seed,
                round_knowledge[r],
                items["path"],
                run_uid,
                timings,
            )["metrics"]
        else:
            vec_metrics = None
        if vec_metrics:
            info["eval"] = {p.reward_backbone: vec_metrics}

    stage_seconds = sum(timings.values())
    wall = time.perf_counter() - t_start
    results = {
        "table1": table1,
        "per_list": per_list,
        "rounds": rounds,
        "timings": timings,
        "wall_seconds": wall,
        "stage_seconds": stage_seconds,
    }
    report = write_report(results, R, p.model_dump())
    for backbone, rows_ in report["tables"]["table1"].items():
        for row, metrics in rows_.items():
            for metric, summary in metrics.items():
                tracker.metrics(parent_run_id, {f"{backbone}.{row}.{metric}": summary["mean"]})
    tracker.metrics(
        parent_run_id,
        {
            "wall_seconds": wall,
            "stage_seconds": stage_seconds,
            "overhead_share": max(0.0, 1 - stage_seconds / wall) if wall else 0.0,
        },
    )
    for path in (report["report"], report["results"], report["plot"]):
        if path:
            tracker.artifact(parent_run_id, path)
    return {
        "run_dir": run,
        "report": report["report"],
        "results": report["results"],
        "wall_seconds": wall,
        "stage_seconds": stage_seconds,
    }


# --------------------------------------------------------------------------- stage helpers


def _sampling(p: IterateParams, n: int, round_idx: int) -> dict:
    return {
        "n": n,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "max_new_tokens": p.max_new_tokens,
        "seed": p.seed + 1000 * round_idx,
    }


def _sample(
    p, prompts_path, splits, n, model, adapter, round_idx, out_dir, n_shards, gpus, run_uid
):
    """Fan the prompts of ``splits`` out over shards (one engine per GPU), then merge."""
    from tasks.loop import merge_samples_task, sample_task, select_prompts_task

    shards = select_prompts_task(
        prompts_path, splits, n_shards, str(out_dir / "prompts"), run_uid=run_uid
    )
    gpu_options = _ray_gpu_options(p, gpus)
    with gpu_options:
        futures = [
            sample_task.submit(
                path,
                str(out_dir / "samples" / f"shard{k:02d}.parquet"),
                model,
                _sampling(p, n, round_idx),
                p.backend,
                adapter,
                round_idx,
                # Under Ray the worker's CUDA_VISIBLE_DEVICES is set by Ray itself.
                gpus[k % len(gpus)] if gpus and p.task_runner != "ray" else None,
                run_uid=run_uid,
            )
            for k, path in enumerate(shards["shards"])
        ]
    results = [f.result() for f in futures]
    return merge_samples_task(results, str(out_dir / "samples.parquet"), run_uid=run_uid)


def _ray_gpu_options(p: IterateParams, gpus: list[int]):
    """With Ray on a GPU host, each sampling shard asks Ray for one whole GPU."""
    from contextlib import nullcontext

    if p.task_runner != "ray" or not gpus:
        return nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=1)


def _knowledge(
    p,
    prompts_path,
    model,
    adapter,
    round_idx,
    out_dir,
    encoder,
    n_shards,
    gpus,
    run_uid,
    timings,
    tag,
) -> dict:
    """One knowledge text per user (every split) and its vector."""
    from tasks.loop import encode_task

    samples = _sample(
        p,
        prompts_path,
        ["train", "valid", "test"],
        1,
        model,
        adapter,
        round_idx,
        out_dir,
        n_shards,
        gpus,
        run_uid,
    )
    timings[f"{tag}.sample"] = samples["seconds"]
    vectors = encode_task(
        samples["path"], prompts_path, str(out_dir / "vectors.parquet"), encoder, run_uid=run_uid
    )
    timings[f"{tag}.encode"] = vectors["seconds"]
    return {"vectors": vectors["path"], "generation": samples["stats"]}


def _train_cfg(p: IterateParams, backbone: str, seed: int) -> dict:
    """Reranker settings (fast CPU default or the paper's) as a plain dict for the task."""
    from tasks.reranker import TrainConfig

    cfg = TrainConfig.paper(backbone) if p.reranker_settings == "paper" else TrainConfig()
    out = cfg.to_dict()
    out.update({"backbone": backbone, "seed": seed})
    if p.reranker_epochs:
        out["epochs"] = p.reranker_epochs
    return out


def _train_eval(p, run, out_dir, backbone, seed, vectors, item_vectors, run_uid, timings) -> dict:
    from tasks.loop import evaluate_task, train_reranker_task

    trained = train_reranker_task(
        run,
        str(out_dir / "model"),
        _train_cfg(p, backbone, seed),
        vectors,
        item_vectors,
        run_uid=run_uid,
    )
    ev = evaluate_task(
        trained["model_dir"], run, vectors, item_vectors, str(out_dir), run_uid=run_uid
    )
    name = "eval." + "/".join(out_dir.parts[-3:])
    timings[name] = trained["seconds"] + ev["seconds"]
    return ev


def _dpo_cfg(p: IterateParams, round_idx: int) -> dict:
    from tasks.dpo import DPOConfig

    cfg = DPOConfig.paper() if p.dpo_settings == "paper" else DPOConfig()
    out = dict(cfg.__dict__)
    out["beta"] = p.dpo_beta
    out["seed"] = p.seed + round_idx
    if "ref" in out:
        out["ref"] = p.dpo_reference
    if p.dpo_max_steps and "max_steps" in out:
        out["max_steps"] = p.dpo_max_steps
    if p.dpo_gradient_checkpointing is not None:
        out["gradient_checkpointing"] = p.dpo_gradient_checkpointing
    return out


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    from tasks.assets import AssetError

    params, _ = parse_params(IterateParams, argv, "python -m flows.iterate", DESCRIPTION)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = iterate(**params.model_dump(exclude_unset=True))
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(Path(result["report"]).read_text())
    print(f"run folder: {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
