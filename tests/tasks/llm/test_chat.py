"""The chat template and stop tokens come from the model, for both generation backends.

A tiny ChatML tokenizer, built here with no download, whose end-of-sequence token
(``<|endoftext|>``) is not the token its template ends an answer with (``<|im_end|>``), as in
Qwen's base tokenizers: generation must stop at the template's end of turn all the same.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tasks.llm.chat import chat_prompt, end_of_turn_token_id, load_tokenizer, stop_token_ids
from tasks.llm.generate import SamplingConfig, generate
from tests.conftest import tiny_lm_config

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ["<|im_end|>", "<|endoftext|>", "<|im_start|>", "[UNK]", "system", "user", "assistant"]
WORDS += ["hi", "Describe", "a", "who", "likes", "films", "."]
IM_END, ENDOFTEXT = 0, 1


def _chatml_tokenizer(out: Path, template: str = CHATML) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = template
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 1-layer Qwen2 with the tiny ChatML tokenizer whose final norm is zero: every logit is
    0, so greedy decoding emits token 0, ``<|im_end|>``, first (the config's eos is
    ``<|endoftext|>``, as a base model's)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = _chatml_tokenizer(tmp_path_factory.mktemp("chatml"))
    cfg = tiny_lm_config(
        Qwen2Config,
        vocab_size=len(WORDS),
        layers=1,
        hidden=32,
        heads=2,
        kv_heads=1,
        max_position_embeddings=128,
        eos_token_id=ENDOFTEXT,
        pad_token_id=ENDOFTEXT,
        bos_token_id=ENDOFTEXT,
    )
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        lm.model.norm.weight.zero_()
    lm.save_pretrained(out)
    return str(out)


def test_stop_tokens_are_the_models(chatml_model: str, tmp_path: Path) -> None:
    tok = load_tokenizer(chatml_model)
    assert chat_prompt(tok, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert end_of_turn_token_id(tok) == IM_END
    # the tokenizer's eos, the template's end of turn and generation_config.json's eos
    assert stop_token_ids(chatml_model) == [IM_END, ENDOFTEXT]
    assert stop_token_ids(tok, {"eos_token_id": [ENDOFTEXT, 9]}) == [IM_END, ENDOFTEXT, 9]
    # a template that ends an answer with no special token adds none
    plain = _chatml_tokenizer(
        tmp_path / "plain", "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    assert end_of_turn_token_id(str(plain)) is None
    assert stop_token_ids(str(plain)) == [ENDOFTEXT]


def test_the_smollm2_default_stops_where_it_did(default_policy_path: str) -> None:
    tok = load_tokenizer(default_policy_path)
    assert stop_token_ids(default_policy_path) == [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(end_of_turn_token_id(tok)) == "<|im_end|>"


def test_transformers_backend_stops_at_the_templates_end_of_turn(chatml_model: str) -> None:
    prompts = pl.DataFrame(
        {"user_id": [1, 2], "prompt": ["hi", "Describe a user who likes films ."]}
    )
    samples, _ = generate(
        prompts,
        chatml_model,
        SamplingConfig(n=1, temperature=0.0, max_new_tokens=5, seed=1),
        backend="transformers",
    )
    # before: only <|endoftext|> stopped it, and every answer ran to the 5-token limit
    assert samples["finish_reason"].to_list() == ["stop", "stop"]
    assert samples["n_tokens"].to_list() == [1, 1]
    assert samples["text"].to_list() == ["", ""]


def test_vllm_jobs_carry_the_models_stop_tokens(chatml_model: str) -> None:
    from tasks.llm.vllm_jobs import run_vllm

    class Engine:
        max_model_len = 64

        def run(self, job: dict) -> dict:
            self.job = job
            pl.DataFrame(
                {
                    "idx": pl.Series([0], dtype=pl.Int64),
                    "sample_idx": pl.Series([0], dtype=pl.Int32),
                    "text": ["x"],
                    "n_tokens": pl.Series([1], dtype=pl.Int32),
                    "finish_reason": ["stop"],
                }
            ).write_parquet(job["out_path"])
            return {"generate_seconds": 0.1}

    engine = Engine()
    cfg = SamplingConfig(n=1, temperature=0.0, max_new_tokens=5, seed=1)
    run_vllm([[2, 5, 7]], chatml_model, cfg, None, None, engine, {})  # type: ignore[arg-type]
    assert engine.job["sampling"]["stop_token_ids"] == [IM_END, ENDOFTEXT]


def test_the_vllm_worker_passes_them_to_vllm(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from tasks.llm.vllm_worker import run_job

    class Output:
        index, text, token_ids, finish_reason = 0, "x", [7, IM_END], "stop"

    class Request:
        outputs = [Output()]

    class LLM:
        def reset_prefix_cache(self) -> None:
            pass

        def generate(self, inputs: list, params: object, **kwargs: object) -> list:
            self.params = params
            return [Request() for _ in inputs]

    pl.DataFrame(
        {"idx": pl.Series([0], dtype=pl.Int64), "prompt_token_ids": [[2, 5, 7]]}
    ).write_parquet(tmp_path / "p.parquet")
    llm = LLM()
    sampling = {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 5, "seed": 1}
    job = {
        "prompts_path": str(tmp_path / "p.parquet"),
        "out_path": str(tmp_path / "s.parquet"),
        "stats_path": str(tmp_path / "s.json"),
        "sampling": {**sampling, "stop_token_ids": [IM_END, ENDOFTEXT]},
        "lora": None,
    }
    run_job(llm, job)
    assert list(llm.params.stop_token_ids) == [IM_END, ENDOFTEXT]
