"""Chat formatting and tokenization with the span of the user's text.

Prompts are wrapped in the model's chat template (with the generation prompt, so the last token is
the post-instruction position) and tokenized without extra special tokens. Each encoded prompt keeps
the token span of the user's own text, which mean pooling and SAE token selection use; padding is
tracked by lengths, never by token id (the embedded tokenizer's pad token also closes chat turns).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from jaxtyping import Int

from mechsafe.errors import MechsafeError


@dataclasses.dataclass
class Encoded:
    """One tokenized prompt."""

    ids: list[int]
    """Token ids of the formatted prompt (chat template included when used)."""
    content: tuple[int, int]
    """Token span ``[start, stop)`` covering the user's text."""

    def __len__(self) -> int:
        return len(self.ids)


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt: str, system: str | None = None, chat: bool = True) -> str:
    """``prompt`` in the tokenizer's chat template with the assistant turn opened.

    Without a chat template (or with ``chat=False``) the prompt is returned unchanged.
    """
    if not chat or not has_chat_template(tokenizer):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn(tokenizer) -> str:
    """The text that closes an assistant turn (the EOS token), appended to teacher-forced responses."""
    return tokenizer.eos_token or ""


def encode_prompts(tokenizer, prompts: Sequence[str], system: str | None = None, chat: bool = True,
                   max_length: int | None = None) -> list[Encoded]:
    """Tokenize prompts (formatted with :func:`format_prompt`) and locate the user's text in tokens.

    A prompt longer than ``max_length`` tokens loses tokens from the start of the user's text, so
    the template and the end of the request (the positions probes read) are kept.
    """
    if tokenizer is None:
        raise MechsafeError("the model has no tokenizer; load it with mechsafe.load_model or give it one")
    out = []
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise MechsafeError("a prompt is empty or not text; remove empty rows from the data")
        text = format_prompt(tokenizer, prompt, system=system, chat=chat)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        if not (chat and has_chat_template(tokenizer)) and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
            offsets = [(0, 0)] + list(offsets)
        c0 = text.rfind(prompt)
        c1 = c0 + len(prompt)
        inside = [i for i, (a, b) in enumerate(offsets) if b > c0 and a < c1 and b > a]
        start, stop = (inside[0], inside[-1] + 1) if inside else (0, len(ids))
        if max_length is not None and len(ids) > max_length:
            excess = len(ids) - max_length
            if stop - start <= excess:
                raise MechsafeError(f"a prompt's template alone exceeds max_length={max_length} tokens; raise max_length")
            ids = ids[:start] + ids[start + excess:]
            stop -= excess
        out.append(Encoded(ids=ids, content=(start, stop)))
    return out


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, " batch"]]:
    """Right-pad token lists into a batch; returns the tokens and each row's true length.

    With a causal model, right padding leaves every real position's activations unchanged, so no
    attention mask is needed; the lengths say which positions are real.
    """
    if not seqs:
        raise MechsafeError("no sequences to batch; the data is empty")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    tokens = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return tokens, lengths


def pad_id(tokenizer) -> int:
    """The id used for padding (its value never matters: padding is tracked by lengths)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
