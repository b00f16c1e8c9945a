"""Table I of the paper on a prepared run: base vs knowledge-augmented DLCM and PRM over seeds.

For each backbone and seed, a base reranker (no knowledge) and a knowledge-augmented one are
trained (:func:`tasks.rlrf4rec.reranker.train_reranker`, checkpoint chosen on validation MAP@5) and
evaluated on the test users. The table gives, per row, the mean over seeds and a t-based 95 %
CI, and for "knowledge - base" two paired intervals: over seeds (t, the per-seed differences
of the means) and over lists (bootstrap on the per-list metrics averaged over seeds).

Command line::

    python -m tasks.rlrf4rec.table1 --run runs/x --knowledge profile --seeds 1,2,3 \
        --backbones dlcm,prm

``--knowledge profile`` uses the profile-and-history part of KAR's prompt alone (no LLM answer);
otherwise it is a parquet file with ``user_id`` and ``text`` (the knowledge text of each user).
Items get a knowledge vector from their title and genres unless ``--no-item-text``, or from
``--item-knowledge FILE`` (a parquet ``item_id, text`` or a JSON ``{id: text}`` / KAR's
``item.klg``, e.g. the ``item_knowledge.parquet`` of a ``--item-knowledge llm`` run; items it
lacks keep their title text).
Artefacts go under ``--out`` (default ``<run>/table1``): one model folder per
(backbone, row, seed), ``eval/*.json`` (+ per-list parquet), ``results.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl

from models.metrics import KS
from models.stats import paired_bootstrap_ci, seed_summary
from tasks.common.io import write_json
from tasks.data.assets import DEFAULT_ENCODER, AssetError
from tasks.data.prepare import load_prepared
from tasks.data.schema import DataError
from tasks.rlrf4rec.encode import encode_frame, encode_texts, vectors_frame
from tasks.rlrf4rec.item_knowledge import item_knowledge_texts, read_item_knowledge
from tasks.rlrf4rec.prompts import prompt_table
from tasks.rlrf4rec.reranker import TRAIN_LOG, TrainConfig, evaluate_reranker, train_reranker
from tasks.rlrf4rec.reranker_results import EvalResult, reference_results, write_eval

log = logging.getLogger(__name__)

HEADLINE = ("map@5", "ndcg@5")
ALL_METRICS = tuple(f"{m}@{k}" for m in ("map", "ndcg") for k in KS)


# --------------------------------------------------------------------------- inputs


def knowledge_texts(run: Path, knowledge: str) -> pl.DataFrame:
    """``user_id``, ``text`` for every user of the run.

    Args:
        run: run folder holding ``data/``.
        knowledge: ``"profile"`` (KAR's profile-and-history prefix, no answer) or a parquet
            path with ``user_id`` and ``text``.
    """
    data = load_prepared(run)
    if knowledge == "profile":
        table = prompt_table(data.users, data.history, data.items, data.meta["dataset"])
        return table.select("user_id", pl.col("prefix").alias("text"))
    path = Path(knowledge)
    if not path.is_file():
        raise ValueError(f"--knowledge {knowledge!r}: neither 'profile' nor a parquet file")
    frame = pl.read_parquet(path)
    if not {"user_id", "text"} <= set(frame.columns):
        raise ValueError(f"--knowledge {path}: needs columns user_id and text, has {frame.columns}")
    needed = set(data.lists["user_id"].unique().to_list())
    missing = needed - set(frame["user_id"].to_list())
    if missing:
        raise ValueError(
            f"--knowledge {path}: no text for {len(missing)} users with lists, "
            f"e.g. {sorted(missing)[:5]}"
        )
    if frame["user_id"].is_duplicated().any():
        raise ValueError(f"--knowledge {path}: more than one text per user")
    return frame.select(pl.col("user_id").cast(pl.Int64), pl.col("text").cast(pl.Utf8))


def build_vectors(
    run: Path,
    texts: pl.DataFrame,
    encoder: str,
    item_text: bool,
    show_progress: bool = True,
    cache_dir: Path | None = None,
    item_knowledge: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """User vectors of ``texts`` and (optionally) item vectors: of ``item_knowledge``'s texts
    (``item_id, text``) where an item has one, else of its title and genres."""
    users = encode_frame(texts, "user_id", "text", encoder, cache_dir, show_progress=show_progress)
    items = None
    if item_text:
        data = load_prepared(run)
        item_strings, counts = item_knowledge_texts(data.items, item_knowledge, source="file")
        if item_knowledge is not None:
            log.info("item knowledge: %s", counts)
        vecs = encode_texts(item_strings, encoder, cache_dir, show_progress=show_progress)
        items = vectors_frame(data.items["item_id"].to_list(), vecs, id_col="item_id")
    return users, items


def fingerprint(
    texts: pl.DataFrame, encoder: str, item_text: bool, items: pl.DataFrame | None = None
) -> str:
    """sha256 of the inputs that define the knowledge rows (texts, encoder, item flag, item
    knowledge texts)."""
    h = hashlib.sha256(f"{encoder}|{item_text}|".encode())
    if items is not None:
        for iid, text in items.sort("item_id").iter_rows():
            h.update(f"item{iid}\x00{text}\x01".encode())
    for uid, text in texts.sort("user_id").iter_rows():
        h.update(f"{uid}\x00{text}\x01".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- runs


def _trained(model_dir: Path, cfg: TrainConfig) -> dict | None:
    """The summary of a finished training with the same config, else None."""
    log_path = model_dir / TRAIN_LOG
    if not log_path.is_file():
        return None
    saved = json.loads(log_path.read_text())
    return saved["summary"] if saved.get("config") == cfg.to_dict() else None


def run_table(
    run: Path,
    out: Path,
    texts: pl.DataFrame,
    seeds: list[int],
    backbones: list[str],
    base_cfg: TrainConfig,
    encoder: str = DEFAULT_ENCODER,
    item_text: bool = True,
    label: str = "knowledge",
    resume: bool = True,
    n_boot: int = 2000,
    cache_dir: Path | None = None,
    item_knowledge: Path | None = None,
) -> dict:
    """Train and evaluate every (backbone, row, seed); return the aggregated results."""
    out.mkdir(parents=True, exist_ok=True)
    items_known = read_item_knowledge(item_knowledge) if item_knowledge else None  # item_id, text
    fp = fingerprint(texts, encoder, item_text, items_known)
    inputs = {"fingerprint": fp, "encoder": encoder, "item_text": item_text, "label": label}
    if item_knowledge:
        inputs["item_knowledge"] = str(item_knowledge)
    marker = out / "inputs.json"
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") != fp:
        if resume:
            raise ValueError(
                f"{out} holds models trained on other knowledge inputs; pass another --out "
                "or --no-resume"
            )
    write_json(inputs, marker)
    users, items = build_vectors(
        run, texts, encoder, item_text, cache_dir=cache_dir, item_knowledge=items_known
    )
    refs = reference_results(run, "test")
    for name, res in refs.items():
        write_eval(res, out / "eval" / f"reference_{name}.json")

    runs: dict[str, dict[str, list[dict]]] = {}
    per_list: dict[tuple[str, str], list[EvalResult]] = {}
    for backbone in backbones:
        runs[backbone] = {"base": [], label: []}
        for seed in seeds:
            for row, uv, iv in (("base", None, None), (label, users, items)):
                cfg = replace(base_cfg, backbone=backbone, seed=seed)
                model_dir = out / backbone / row / f"seed_{seed}"
                summary = _trained(model_dir, cfg) if resume else None
                if summary is None:
                    t0 = time.perf_counter()
                    summary = train_reranker(run, model_dir, cfg, uv, iv, show_progress=True)
                    log.info("%s/%s seed %d: %.0f s", backbone, row, seed, time.perf_counter() - t0)
                result = evaluate_reranker(model_dir, run, uv, name=f"{backbone}/{row}")
                write_eval(result, out / "eval" / f"{backbone}_{row}_seed{seed}.json")
                runs[backbone][row].append(
                    {"seed": seed, "summary": summary, "test": result.metrics}
                )
                per_list.setdefault((backbone, row), []).append(result)
    results = aggregate(runs, per_list, refs, label, n_boot)
    results["inputs"] = inputs
    results["train_config"] = base_cfg.to_dict()
    results["seeds"] = seeds
    write_json(results, out / "results.json")
    table = format_table(results)
    (out / "table.md").write_text(table + "\n")
    return results


def _mean_per_list(results: list[EvalResult]) -> pl.DataFrame:
    """Per-list metrics averaged over seeds (lists aligned by list_id)."""
    frames = [r.per_list.sort("list_id") for r in results]
    ids = frames[0]["list_id"]
    for f in frames[1:]:
        if not f["list_id"].equals(ids):
            raise ValueError("per-list results of different seeds cover different lists")
    cols = {m: np.mean([f[m].to_numpy() for f in frames], axis=0) for m in ALL_METRICS}
    return pl.DataFrame({"list_id": ids, **cols})


def aggregate(
    runs: dict[str, dict[str, list[dict]]],
    per_list: dict[tuple[str, str], list[EvalResult]],
    refs: dict[str, EvalResult],
    label: str,
    n_boot: int = 2000,
) -> dict:
    """Seed summaries per row and metric, and the paired knowledge - base intervals."""
    out: dict = {"label": label, "reference": {k: v.metrics for k, v in refs.items()}}
    out["n_test_lists"] = next(iter(refs.values())).n_lists
    out["backbones"] = {}
    for backbone, rows in runs.items():
        entry: dict = {"rows": {}, "delta": {}}
        for row, items in rows.items():
            entry["rows"][row] = {
                m: seed_summary([it["test"][m] for it in items]) for m in ALL_METRICS
            }
            entry["rows"][row]["best_epoch"] = [it["summary"]["best_epoch"] for it in items]
            entry["rows"][row]["seconds_per_epoch"] = float(
                np.mean([it["summary"]["seconds_per_epoch"] for it in items])
            )
        base, know = rows["base"], rows[label]
        lists_base = _mean_per_list(per_list[(backbone, "base")])
        lists_know = _mean_per_list(per_list[(backbone, label)])
        for m in ALL_METRICS:
            diffs = [k["test"][m] - b["test"][m] for k, b in zip(know, base, strict=True)]
            entry["delta"][m] = {
                "seeds": seed_summary(diffs),
                "lists": paired_bootstrap_ci(lists_know[m], lists_base[m], n_boot=n_boot),
            }
        out["backbones"][backbone] = entry
    return out


# --------------------------------------------------------------------------- printing


def _ci(s: dict) -> str:
    return f"{s['mean']:.4f} [{s['ci_low']:.4f}, {s['ci_high']:.4f}]"


def _delta(d: dict) -> str:
    return f"{d['mean_diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"


def format_table(results: dict, metrics: tuple[str, ...] = HEADLINE) -> str:
    """A markdown table like the paper's Table I (mean [95 % CI] over seeds)."""
    label = results["label"]
    names = [m.upper() for m in metrics]
    head = "| Backbone | Row | " + " | ".join(names) + " | best epochs |"
    lines = [head, "|" + "---|" * (len(metrics) + 3)]
    for backbone, entry in results["backbones"].items():
        for row, summ in entry["rows"].items():
            cells = " | ".join(_ci(summ[m]) for m in metrics)
            epochs = ",".join(str(e) for e in summ["best_epoch"])
            lines.append(f"| {backbone.upper()} | {row} | {cells} | {epochs} |")
        seeds_d = " | ".join(
            f"{s['mean']:+.4f} [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]"
            for s in (entry["delta"][m]["seeds"] for m in metrics)
        )
        lists_d = " | ".join(_delta(entry["delta"][m]["lists"]) for m in metrics)
        pvals = ", ".join(f"{entry['delta'][m]['lists']['p_value']:.2f}" for m in metrics)
        lines.append(f"| {backbone.upper()} | {label} - base (seeds, t) | {seeds_d} | |")
        lines.append(
            f"| {backbone.upper()} | {label} - base (lists, bootstrap) | {lists_d} | p {pvals} |"
        )
    for name, m in results["reference"].items():
        cells = " | ".join(f"{m[k]:.4f}" for k in metrics)
        lines.append(f"| reference | {name} | {cells} | |")
    n_seeds = len(results.get("seeds", [])) or "?"
    lines.append("")
    lines.append(
        f"Test lists: {results['n_test_lists']}; {n_seeds} seeds; mean [95 % t-CI over seeds]; "
        "deltas: paired over seeds (t) and over lists (bootstrap of seed-averaged per-list "
        "metrics)."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        msg = f"expected integers separated by commas, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def _backbones(text: str) -> list[str]:
    values = [x.strip().lower() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in ("dlcm", "prm")]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"backbones must be among dlcm,prm; got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tasks.rlrf4rec.table1",
        description="Train base and knowledge-augmented DLCM/PRM rerankers over seeds and print "
        "a Table I-like summary (mean and 95%% CI over seeds, paired CI of knowledge - base).",
    )
    p.add_argument("--run", required=True, type=Path, help="prepared run folder (holds data/)")
    p.add_argument(
        "--knowledge",
        required=True,
        help="'profile' (profile-and-history prefix, no LLM answer) or a parquet file with "
        "user_id and text",
    )
    p.add_argument("--seeds", type=_int_list, default=[1, 2, 3], help="e.g. 1,2,3")
    p.add_argument("--backbones", type=_backbones, default=["dlcm", "prm"], help="e.g. dlcm,prm")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, help="knowledge encoder id or folder")
    p.add_argument(
        "--no-item-text",
        action="store_true",
        help="no item knowledge vectors (by default items are encoded from title + genres)",
    )
    p.add_argument(
        "--item-knowledge",
        type=Path,
        default=None,
        help="item texts to encode instead of title + genres: a parquet (item_id, text) or a "
        "JSON ({id: text}, or KAR's item.klg); items it lacks keep their title text",
    )
    p.add_argument("--label", default=None, help="name of the knowledge row (default: from input)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default <run>/table1)")
    p.add_argument("--paper", action="store_true", help="paper settings: batch 64, lr 1e-3, 50 ep")
    p.add_argument("--epochs", type=int, default=None, help="override the maximum epochs")
    p.add_argument("--batch-size", type=int, default=None, help="override the batch size")
    p.add_argument("--lr", type=float, default=None, help="override the learning rate")
    p.add_argument("--patience", type=int, default=None, help="override early-stop patience")
    p.add_argument("--threads", type=int, default=None, help="torch threads while training")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="embedding cache (default: asset cache)"
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="retrain even when a finished model with the same settings exists",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.paper("dlcm") if args.paper else TrainConfig()
    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "patience": args.patience,
        "num_threads": args.threads,
    }
    try:
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        texts = knowledge_texts(args.run, args.knowledge)
        label = args.label or (
            "profile" if args.knowledge == "profile" else Path(args.knowledge).stem
        )
        out = args.out or args.run / "table1"
        results = run_table(
            args.run,
            out,
            texts,
            args.seeds,
            args.backbones,
            cfg,
            encoder=args.encoder,
            item_text=not args.no_item_text,
            label=label,
            resume=not args.no_resume,
            n_boot=args.n_boot,
            cache_dir=args.cache_dir,
            item_knowledge=args.item_knowledge,
        )
    except (ValueError, DataError, AssetError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(results))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
