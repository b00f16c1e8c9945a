"""Chat messages and templates of the policy LLM.

Prompts are stored as plain user messages and answers as plain assistant texts; the trainers
give them to TRL in its conversational format (:func:`user_messages`,
:func:`assistant_messages`) and the generator wraps them in the model's chat template
(:func:`chat_prompt`), so the template applies the same way in training and generation.
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
