"""Chat messages and templates of the policy LLM.

Prompts are stored as plain user messages and answers as plain assistant texts; the trainers
give them to TRL in its conversational format (:func:`user_messages`,
:func:`assistant_messages`) and the generator wraps them in the model's chat template
(:func:`chat_prompt`), so the template applies the same way in training and generation.

Generation stops where the template ends an answer: :func:`stop_token_ids` (the tokenizer's
end-of-sequence token, the generation config's, and the token the chat template writes after
an assistant answer, e.g. ChatML's ``<|im_end|>``), for the transformers backend and vLLM
alike; TRL trains on the template's rendering of the answer, which ends with that same token.
Nothing here is specific to one model.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any


def user_messages(prompts: Sequence[str]) -> list[list[dict[str, str]]]:
    """TRL conversational prompts: one user message each."""
    return [[{"role": "user", "content": p}] for p in prompts]


def assistant_messages(texts: Sequence[str]) -> list[list[dict[str, str]]]:
    """TRL conversational completions: one assistant message each."""
    return [[{"role": "assistant", "content": t}] for t in texts]


@functools.lru_cache(maxsize=8)
def _tokenizer_from(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def load_tokenizer(tokenizer: Any = None) -> Any:
    """A tokenizer object from an object, a path or model id (cached), or None (default policy)."""
    if tokenizer is None:
        from tasks.data.assets import policy_model

        tokenizer = policy_model()
    if isinstance(tokenizer, str):
        return _tokenizer_from(tokenizer)
    if not hasattr(tokenizer, "apply_chat_template"):
        raise TypeError(
            f"tokenizer: expected a tokenizer, a path or a model id, got {type(tokenizer).__name__}"
        )
    return tokenizer


def chat_prompt(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """The user message ``prompt`` in the model's chat template, ready for the assistant's turn.

    Args:
        tokenizer: a tokenizer with a chat template, or a path / model id to load one from.
        prompt: the plain user message.
        system: an optional system message (default: whatever the template adds by itself).

    The text already holds the template's special tokens: tokenize it with
    ``add_special_tokens=False``.
    """
    tok = load_tokenizer(tokenizer)
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tok, 'name_or_path', tok)!r} has no chat template")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_ANSWER_MARK = "RLRF4RECANSWERMARK"


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """The special token the chat template writes right after an assistant answer (ChatML's
    ``<|im_end|>``), or None when the template writes none (or cannot render an answer)."""
    tok = load_tokenizer(tokenizer)
    if not getattr(tok, "chat_template", None):
        return None
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": _ANSWER_MARK},
    ]
    try:
        text = tok.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation names no token
        return None
    if _ANSWER_MARK not in text:
        return None
    after = text[text.rindex(_ANSWER_MARK) + len(_ANSWER_MARK) :]
    ids = tok(after, add_special_tokens=False)["input_ids"] if after else []
    if ids and ids[0] in set(tok.all_special_ids):
        return int(ids[0])
    return None


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """The token ids generation stops at, all from the model: the tokenizer's end-of-sequence
    token, the generation config's ``eos_token_id`` (one id or a list; ``generation_config`` an
    object, a dict, or None to read ``generation_config.json`` beside a tokenizer given as a
    path) and :func:`end_of_turn_token_id`. Sorted, without duplicates."""
    tok = load_tokenizer(tokenizer)
    if generation_config is None and isinstance(tokenizer, str):
        generation_config = _generation_config_of(tokenizer)
    ids = {tok.eos_token_id, end_of_turn_token_id(tok)}
    if isinstance(generation_config, dict):
        configured = generation_config.get("eos_token_id")
    else:
        configured = getattr(generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list | tuple) else [configured])
    ids.discard(None)
    return sorted(int(i) for i in ids)


@functools.lru_cache(maxsize=8)
def _generation_config_of(name: str) -> dict[str, Any] | None:
    """``generation_config.json`` of a local model folder (None: none there)."""
    import json
    from pathlib import Path

    path = Path(name) / "generation_config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())
