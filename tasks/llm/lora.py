"""LoRA adapters of the policy LLM: the trainers' shared plumbing and merging into the base.

Training (used by :mod:`tasks.llm.dpo`, :mod:`tasks.llm.sft` and :mod:`tasks.llm.online_rl`):
:class:`LoraTrainConfig` holds the settings they share, :func:`load_policy` the model to train
(a fresh LoRA, or ``init_adapter`` trained further, so the adapter always stays relative to the
base model), :func:`trainer_args` the TRL / transformers arguments, :func:`save_outputs` the
output folder (``adapter/``, ``merged/`` with ``merge=True``, ``metrics.json``, ``config.json``)
and :func:`summarize_log` the metrics of the last epoch.

Merging: :func:`merge_lora` writes ``base + adapter`` as a plain checkpoint;
:func:`merged_checkpoint` makes it once per adapter, cached beside it (what the vLLM generator
serves by default).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from tasks.common.hardware import torch_dtype
from tasks.common.hashing import file_sha256
from tasks.llm.chat import load_tokenizer
from tasks.llm.devices import available_gpus

log = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraTrainConfig:
    """Settings shared by the LoRA trainers (DPO, SFT, online RL).

    Attributes:
        lr: learning rate (AdamW, linear decay).
        epochs: passes over the data.
        batch_size: examples per device step.
        grad_accum: gradient accumulation steps (effective batch = batch_size * grad_accum).
        max_length: token limit of prompt + answer (longer sequences are truncated at the end).
        lora_r, lora_alpha, lora_dropout, lora_target_modules: the LoRA adapter.
        lora_layers: adapt only the top this many decoder layers (0: every layer). Without
            gradient checkpointing the backward pass then stops at the lowest adapted layer:
            a CPU lever (``bench/bench_sft.py --levers`` prints its figures).
        seed: seed of the adapter initialisation and the data order.
        merge: also write a merged checkpoint (base + adapter) for the generator.
        max_steps: stop after this many optimizer steps (-1: run the epochs).
        logging_steps: log the metrics every this many optimizer steps.
        gradient_checkpointing: recompute activations in the backward pass. None: on when
            every layer is adapted, off with ``lora_layers`` (checkpointing makes the backward
            pass run down to the embeddings; :class:`tasks.llm.dpo.DPOConfig` turns it off).
            It trades time for memory (``bench/bench_dpo.py --levers`` prints the figures).
        cpu_bf16_autocast: on a CPU with native bf16, run the matmuls in bf16 (autocast; the
            weights and the LoRA stay fp32). Off by default: measured on DPO it is about
            1.5x faster but changes the loss after one step (``bench/bench_dpo.py --levers``);
            :mod:`tasks.llm.bf16_backward` puts only the backward in bf16 instead.
        device: ``cpu``, ``cuda``, ``cuda:1``; None: ``cuda`` when available.
    """

    lr: float = 1e-4
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    lora_layers: int = 0
    seed: int = 0
    merge: bool = False
    max_steps: int = -1
    logging_steps: int = 1
    gradient_checkpointing: bool | None = None
    cpu_bf16_autocast: bool = False
    device: str | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.lr <= 0:
            raise ValueError(f"{name}.lr must be > 0, got {self.lr}")
        if self.epochs <= 0:
            raise ValueError(f"{name}.epochs must be > 0, got {self.epochs}")
        for attr in ("batch_size", "grad_accum", "max_length", "lora_r", "logging_steps"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{attr} must be a positive int, got {value!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"{name}.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not isinstance(self.lora_layers, int) or self.lora_layers < 0:
            raise ValueError(f"{name}.lora_layers must be an int >= 0, got {self.lora_layers!r}")
        if not self.lora_target_modules:
            raise ValueError(f"{name}.lora_target_modules must name at least one module")
        if isinstance(self.lora_target_modules, str):
            object.__setattr__(self, "lora_target_modules", (self.lora_target_modules,))
        else:
            object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON, MLflow params)."""
        d = asdict(self)
        d["lora_target_modules"] = list(self.lora_target_modules)
        return d


# --------------------------------------------------------------------------- trainer plumbing


def resolve_device(device: str | None = None) -> Any:
    """``torch.device``: the one asked for, else ``cuda`` when available, else ``cpu``."""
    import torch

    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require_columns(frame: pl.DataFrame, columns: Sequence[str], name: str) -> None:
    """Raise a ValueError naming ``name`` when ``frame`` lacks a column, is empty or has nulls."""
    if not isinstance(frame, pl.DataFrame):
        raise TypeError(f"{name}: expected a polars DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; has {frame.columns}")
    if frame.height == 0:
        raise ValueError(f"{name}: empty frame, nothing to train on")
    nulls = [c for c in columns if frame[c].null_count()]
    if nulls:
        raise ValueError(f"{name}: null values in column(s) {nulls}")


def load_policy(
    model: str, cfg: LoraTrainConfig, init_adapter: str | None, device: Any
) -> tuple[Any, Any, Any]:
    """The model to train, its LoRA config (None when ``init_adapter`` is loaded) and tokenizer.

    fp32 on CPU, bf16 on GPU (:func:`tasks.common.hardware.train_dtype`). With ``init_adapter`` the
    adapter is loaded trainable (training continues from it); otherwise a fresh LoRA is created
    by the trainer from the config.
    """
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.common.hardware import train_dtype

    base = AutoModelForCausalLM.from_pretrained(model, dtype=train_dtype(device))
    tokenizer = load_tokenizer(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if init_adapter:
        if not (Path(init_adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"init_adapter={init_adapter!r}: no adapter_config.json")
        policy = PeftModel.from_pretrained(base, str(init_adapter), is_trainable=True)
        loaded = policy.peft_config["default"]
        if int(loaded.r) != cfg.lora_r or set(loaded.target_modules or ()) != set(
            cfg.lora_target_modules
        ):
            log.warning(
                "init_adapter has r=%s on %s; training continues with it (config asks r=%s on %s)",
                loaded.r,
                sorted(loaded.target_modules or ()),
                cfg.lora_r,
                list(cfg.lora_target_modules),
            )
        return policy, None, tokenizer
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        layers_to_transform=top_layers(base.config.num_hidden_layers, cfg.lora_layers),
        task_type="CAUSAL_LM",
    )
    return base, lora, tokenizer


def require_frozen_copy(peft_model: Any, init_adapter: str, trainer: str) -> None:
    """Fail unless the built trainer's model holds TRL's frozen copy of ``init_adapter`` (the
    adapter named ``ref``): the reference of a run that trains ``init_adapter`` further."""
    adapters = set(getattr(peft_model, "peft_config", {}) or {})
    if "ref" not in adapters:
        raise RuntimeError(
            f"{trainer}: the reference should be a frozen copy of {init_adapter}, but the "
            f"trainer holds the adapters {sorted(adapters)}: this TRL version builds its "
            "reference differently"
        )


def top_layers(n_layers: int, k: int) -> list[int] | None:
    """The indices of the top ``k`` of ``n_layers`` decoder layers (None: every layer)."""
    if k <= 0 or k >= n_layers:
        return None
    return list(range(n_layers - k, n_layers))


def trainer_args(cfg: LoraTrainConfig, output_dir: Path, device: Any) -> dict[str, Any]:
    """The TRL / transformers training arguments every wrapper shares (``device``: a
    ``torch.device`` or its name, ``cpu`` / ``cuda:1``)."""
    from tasks.common.hardware import cpu_flags, native_bf16

    on_gpu = getattr(device, "type", str(device).split(":")[0]) == "cuda"
    checkpointing = cfg.gradient_checkpointing
    if checkpointing is None:
        checkpointing = cfg.lora_layers == 0
    autocast = cfg.cpu_bf16_autocast and not on_gpu
    if autocast and not native_bf16(cpu_flags()):
        raise ValueError(
            f"{type(cfg).__name__}.cpu_bf16_autocast=True: this CPU has no native bf16 "
            "(amx_bf16 or avx512_bf16), where bf16 matmuls are many times slower than fp32"
        )
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "learning_rate": cfg.lr,
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "no",
        "report_to": "none",
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "bf16": on_gpu or autocast,
        "fp16": False,
        "use_cpu": not on_gpu,
        "gradient_checkpointing": checkpointing,
        "dataloader_num_workers": 0,
    }


def summarize_log(log_history: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    """Means of ``keys`` over the logged steps of the last epoch (the trained policy's figures)."""
    steps = [h for h in log_history if any(k in h for k in keys) and "train_runtime" not in h]
    if not steps:
        return {}
    last_epoch = max(float(h.get("epoch", 0.0)) for h in steps)
    start = max(0.0, float(int(last_epoch - 1e-9)))  # the last (possibly partial) epoch
    window = [h for h in steps if float(h.get("epoch", 0.0)) > start] or steps
    out = {}
    for k in keys:
        values = [float(h[k]) for h in window if k in h]
        if values:
            out[k] = sum(values) / len(values)
    return out


def save_outputs(
    trainer: Any,
    tmp: Path,
    out_dir: Path,
    model: str,
    cfg: LoraTrainConfig,
    metrics: dict[str, Any],
    kind: str,
) -> dict[str, Any]:
    """Save the adapter (and the merged checkpoint) into ``tmp``; return final paths + metrics."""
    policy = trainer.model
    adapters = list(getattr(policy, "peft_config", {}).keys())
    selected = ["default"] if "default" in adapters else None
    policy.save_pretrained(str(tmp / "adapter"), selected_adapters=selected)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    merged = None
    if cfg.merge:
        merge_lora(model, tmp / "adapter", tmp / "merged")
        merged = str(out_dir / "merged")
    history = list(trainer.state.log_history)
    (tmp / "metrics.json").write_text(
        json.dumps({"metrics": metrics, "log_history": history}, indent=2, default=str) + "\n"
    )
    (tmp / "config.json").write_text(
        json.dumps({"kind": kind, "model": model, **cfg.to_dict()}, indent=2) + "\n"
    )
    return {"adapter_dir": str(out_dir / "adapter"), "merged_dir": merged, "metrics": metrics}


# --------------------------------------------------------------------------- merging


def check_adapter(adapter: str | Path) -> Path:
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"adapter={str(adapter)!r}: no adapter_config.json (not a PEFT dir)"
        )
    return path


def _merge_dtype(model: str) -> Any:
    """The dtype a merged checkpoint is saved in: the base's on a GPU host, else the CPU's."""
    import torch
    from transformers import AutoConfig

    if not available_gpus():
        return torch_dtype("cpu")
    config = AutoConfig.from_pretrained(model)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _merge_info(model: str, adapter: Path) -> dict[str, str]:
    # The adapter's weights identify it (its folder may be renamed into place after merging);
    # the dtype, because a run folder may move to a machine that chooses another one.
    weights = adapter / "adapter_model.safetensors"
    digest = file_sha256(weights) if weights.is_file() else ""
    dtype = str(_merge_dtype(model)).removeprefix("torch.")
    return {"base": str(model), "adapter_sha256": digest, "dtype": dtype}


def merge_lora(model: str, adapter: str | Path, out_dir: str | Path) -> str:
    """Merge the PEFT LoRA ``adapter`` into ``model`` and save a plain checkpoint at ``out_dir``.

    The merge is done in fp32 and saved, on a GPU host, in the base model's dtype; on a CPU host
    in the CPU's dtype (:func:`tasks.common.hardware.cpu_dtype`: fp32 without native bf16), with the
    tokenizer and a ``merge_info.json`` (base model, sha256 of the adapter weights, dtype).
    Written to a temporary folder and renamed into place; when another process finished the same
    folder first, its copy is kept.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = check_adapter(adapter)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    dtype = _merge_dtype(model)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged = merged.to(dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        merged.save_pretrained(tmp)
        load_tokenizer(model).save_pretrained(tmp)
        (tmp / "merge_info.json").write_text(json.dumps(_merge_info(model, adapter), indent=2))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process put a complete copy there meanwhile
            log.info("merged checkpoint %s appeared meanwhile; keeping it", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged %s + %s -> %s in %.1f s", model, adapter, out_dir, time.perf_counter() - t0)
    return str(out_dir)


def merged_checkpoint(model: str, adapter: str | Path) -> str:
    """A merged checkpoint of ``model`` + ``adapter``, made once and cached beside the adapter.

    The cache is ``<adapter's parent>/merged`` (where :func:`tasks.llm.dpo.train_dpo` writes it
    with ``merge=True``), reused when its ``merge_info.json`` names the same base and the same
    adapter weights; a folder there that is not a merge of ours is left alone and
    ``<adapter>.merged`` is used instead.
    """
    adapter = check_adapter(adapter)
    target = adapter.parent / "merged"
    if target.exists() and not (target / "merge_info.json").is_file():
        target = adapter.with_name(adapter.name + ".merged")
    info = target / "merge_info.json"
    if info.is_file() and json.loads(info.read_text()) == _merge_info(model, adapter):
        return str(target)
    return merge_lora(model, adapter, target)
