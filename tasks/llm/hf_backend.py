"""The transformers backend of the generator: batched ``generate`` with left padding, in this
process.

Prompts are sorted longest first and cut into batches (similar lengths waste less padding);
each batch is sampled with a seed drawn from ``(seed, batch index)``, so the same seed and
inputs give the same texts. An adapter is merged into the model in memory.
"""

from __future__ import annotations

import time
from typing import Any

import polars as pl

from tasks.common.hardware import torch_dtype
from tasks.llm.chat import stop_token_ids
from tasks.llm.sampling import SamplingConfig, raw_sample_rows, raw_samples_frame


def _seed_for_batch(seed: int, batch: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def _hf_dtype(device: Any, dtype: str) -> Any:
    """A torch dtype name as asked; ``auto``: :func:`tasks.common.hardware.torch_dtype` (bf16
    on GPU; on CPU bf16 only with native bf16 instructions, AVX512-BF16 / AMX, else fp32), the same
    dtype the vLLM backend runs in."""
    import torch

    if dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r}: not a torch dtype name")
        return getattr(torch, dtype)
    return torch_dtype(device)


class NucleusProcessor:
    """Temperature then top-p, as transformers' warpers do, with
    :func:`tasks.llm.top_p.top_p_filter` instead of their sort of the whole vocabulary (for a
    trained model's peaked distributions the nucleus is found among the top 256 logits; a flat
    one, such as the tests' random tiny model, still falls back to the sort). ``generate`` then
    runs at temperature 1 and top-p 1, so it adds no warper of its own: a
    custom processor runs before transformers' warpers, which would put top-p before the
    temperature."""

    def __init__(self, temperature: float, top_p: float) -> None:
        import torch

        from tasks.llm.top_p import top_p_filter  # imported once, not at every decoding step

        self.temperature, self.top_p, self._filter = temperature, top_p, top_p_filter
        self._p_dtype = torch.float32  # the nucleus mass in fp32 whatever the logits' dtype

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """``scores``: ``(batch, vocab)`` logits; the kept ones divided by the temperature, the
        rest ``-inf``."""
        scores = scores / self.temperature
        if self.top_p >= 1:
            return scores
        p = scores.new_full((scores.shape[0],), self.top_p, dtype=self._p_dtype)
        return self._filter(scores, p)


def sampling_kwargs(cfg: SamplingConfig, device: Any) -> dict[str, Any]:
    """``generate``'s sampling arguments: greedy at temperature 0; on CPU the nucleus through
    :class:`NucleusProcessor`, on GPU transformers' own warpers."""
    if cfg.temperature <= 0:
        return {"do_sample": False}
    if getattr(device, "type", str(device)) != "cpu":
        return {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
    from transformers import LogitsProcessorList

    nucleus = NucleusProcessor(cfg.temperature, cfg.top_p)
    return {
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "logits_processor": LogitsProcessorList([nucleus]),
    }


def run_transformers(
    prompt_ids: list[list[int]],
    model: str,
    adapter: str | None,
    cfg: SamplingConfig,
    tokenizer: Any,
    gpu: int | None,
    batch_size: int | None,
    dtype: str,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Batched ``generate`` with left padding; rows keyed by ``idx`` (the prompt's position)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    if gpu is not None:
        device = torch.device(f"cuda:{gpu}")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_dtype = _hf_dtype(device, dtype)
    t0 = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=run_dtype)
    if adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter).merge_and_unload()
    lm.to(device).eval()
    load_seconds = time.perf_counter() - t0

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    eos_ids = set(stop_token_ids(tokenizer, lm.generation_config))  # the model's, as vLLM's
    batch_size = batch_size or (32 if device.type == "cuda" else 8)
    # Longest first: batches of similar lengths waste less padding. The order is fixed by the
    # inputs, so the batches, their seeds and the texts are too.
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rows = raw_sample_rows()
    kwargs = sampling_kwargs(cfg, device)
    t1 = time.perf_counter()
    for b, batch in enumerate(tqdm(batches, desc="generate", unit="batch", leave=False)):
        width = max(len(prompt_ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            ids = prompt_ids[i]
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            attention[r, width - len(ids) :] = 1
        torch.manual_seed(_seed_for_batch(cfg.seed, b))
        with torch.inference_mode():
            out = lm.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=cfg.max_new_tokens,
                num_return_sequences=cfg.n,
                pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids),
                **kwargs,
            )
        gen = out[:, width:].cpu()
        for row in range(gen.shape[0]):
            idx, j = batch[row // cfg.n], row % cfg.n
            tokens = gen[row].tolist()
            stop = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
            if stop is None:
                n_tok, finish = len(tokens), "length"
            else:
                n_tok, finish = stop + 1, "stop"
            rows["idx"].append(idx)
            rows["sample_idx"].append(j)
            rows["text"].append(tokenizer.decode(tokens[:n_tok], skip_special_tokens=True))
            rows["n_tokens"].append(n_tok)
            rows["finish"].append(finish)
    seconds = time.perf_counter() - t1
    frame = raw_samples_frame(rows)
    stats = {
        "generate_seconds": seconds,
        "generated_tokens": int(sum(rows["n_tokens"])),
        "prompt_tokens": int(sum(len(p) for p in prompt_ids)),
        "engine_start_seconds": load_seconds,
        "device": str(device),
        "dtype": str(run_dtype).removeprefix("torch."),
        "batch_size": batch_size,
    }
    del lm
    return frame, stats
