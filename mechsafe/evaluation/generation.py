"""Batched generation and last-position logits through a ``HookedTransformer``.

Generation runs the tokens every prompt of a batch starts with (the chat template's system turn) once
into a TransformerLens key-value cache, left-pads the rest of each prompt after them, passes an explicit
attention mask built from the prompt lengths (never from token ids: the pad token ``<|im_end|>`` also
ends every chat turn) and decodes from the cache. TransformerLens derives rotary positions from the
mask's cumulative sum, so a padded row sees the same positions as the prompt alone, and greedy batched
output equals unbatched output. Hooks on the model (e.g. from :mod:`mechsafe.interventions`) stay
active for the shared prefix, the rest of the prompt and every decoding step (each a forward pass of
its own).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from mechsafe.chat import encode_prompts, pad_id, pad_right
from mechsafe.errors import MechsafeError
from mechsafe.forward import common_prefix_length, last_logits, prefix_cache, unembed
from mechsafe.models import model_info
from mechsafe.runs import read_json, stable_hash, write_json

logger = logging.getLogger(__name__)

_MIN_SHARED_PREFIX = 4
"""Shortest common prompt prefix (tokens) that is run once per batch and reused from a key-value cache."""


def pad_left(seqs: Sequence[Sequence[int]], pad: int) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
    """Left-pad token lists; returns the tokens and the attention mask (1 on real tokens)."""
    if not seqs:
        raise MechsafeError("no sequences to batch; the data is empty")
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.int)
    for i, s in enumerate(seqs):
        if len(s):
            tokens[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return tokens, mask


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (sorted), so little padding is computed."""
    if batch_size < 1:
        raise MechsafeError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _shared_prefix_length(seqs: Sequence[Sequence[int]], share: bool) -> int:
    """Leading tokens a batch shares that are worth one pass of their own (0: none, or ``share`` is off)."""
    n = common_prefix_length(seqs) if share and len(seqs) > 1 else 0
    return n if n >= _MIN_SHARED_PREFIX else 0


def _shared_prefix_last_logits(model: HookedTransformer, seqs: list[list[int]], prefix: int,
                               pad: int) -> Float[torch.Tensor, "batch d_vocab"]:
    """Last-position logits of sequences sharing ``prefix`` tokens: the prefix is run once (batch 1)
    into a key-value cache that every row then continues from (right-padded, with a mask)."""
    device = model.cfg.device
    batch = len(seqs)
    cache, _ = prefix_cache(model, seqs[0][:prefix], batch)
    tails, lengths = pad_right([s[prefix:] for s in seqs], pad)
    mask = (torch.arange(tails.shape[1])[None, :] < lengths[:, None]).to(torch.int)
    resid = model(tails.to(device), attention_mask=mask.to(device), past_kv_cache=cache,
                  stop_at_layer=model.cfg.n_layers)
    rows = torch.arange(batch, device=resid.device)
    return unembed(model, resid[rows, lengths.to(resid.device) - 1])


def prompt_last_logits(model: HookedTransformer, prompts: Sequence[str], batch_size: int = 16,
                       system: str | None = None, share_prefix: bool = True) -> Float[torch.Tensor, "batch d_vocab"]:
    """Next-token logits after each chat-formatted prompt (the first token of the answer).

    With ``share_prefix`` the tokens every prompt of a batch starts with (the chat template's
    system turn) are computed once per batch and reused through a key-value cache; hooks apply to
    the prefix pass as well, so interventions see every position exactly once.
    """
    enc = encode_prompts(model.tokenizer, list(prompts), system=system)
    out = torch.empty((len(enc), model.cfg.d_vocab), dtype=torch.float32)
    pad = pad_id(model.tokenizer)
    with torch.inference_mode():
        for idx in length_batches([len(e) for e in enc], batch_size):
            seqs = [enc[i].ids for i in idx]
            prefix = _shared_prefix_length(seqs, share_prefix)
            if prefix:
                logits = _shared_prefix_last_logits(model, seqs, prefix, pad)
            else:
                tokens, lengths = pad_right(seqs, pad)
                logits = last_logits(model, tokens, lengths)
            out[idx] = logits.float().cpu()
    return out


def _pick(logits: Float[torch.Tensor, "batch d_vocab"], temperature: float, gen: torch.Generator) -> Int[torch.Tensor, " batch"]:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0].to(logits.device)


def _generate_batch(model: HookedTransformer, seqs: list[list[int]], max_new_tokens: int, temperature: float,
                    eos: int | None, pad: int, gen: torch.Generator, share_prefix: bool) -> list[list[int]]:
    device = model.cfg.device
    batch = len(seqs)
    prefix = _shared_prefix_length(seqs, share_prefix)
    if prefix:  # the tokens every prompt starts with run once; each row's rest follows them, left-padded
        cache, _ = prefix_cache(model, seqs[0][:prefix], batch)
    else:
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, batch)
    tokens, mask = pad_left([s[prefix:] for s in seqs], pad)
    outs: list[list[int]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool)
    resid = model(tokens.to(device), attention_mask=mask.to(device), past_kv_cache=cache,
                  stop_at_layer=model.cfg.n_layers)
    logits = unembed(model, resid[:, -1])
    step_mask = torch.ones((batch, 1), dtype=torch.int, device=device)
    for step in range(max_new_tokens):
        nxt = _pick(logits, temperature, gen).cpu()
        for i in range(batch):
            if finished[i]:
                continue
            tok = int(nxt[i])
            if eos is not None and tok == eos:
                finished[i] = True
            else:
                outs[i].append(tok)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if eos is not None:
            nxt = torch.where(finished, torch.tensor(eos), nxt)
        resid = model(nxt[:, None].to(device), attention_mask=step_mask, past_kv_cache=cache,
                      stop_at_layer=model.cfg.n_layers)
        logits = unembed(model, resid[:, -1])
    return outs


def generate(model: HookedTransformer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8,
             temperature: float = 0.0, system: str | None = None, seed: int = 0, progress: bool = True,
             chat: bool = True, share_prefix: bool = True) -> list[str]:
    """Generate a response to each prompt (chat-formatted), in the input order.

    Args:
        model: a ``HookedTransformer`` with a tokenizer; its active hooks apply.
        prompts: user messages.
        max_new_tokens: most tokens generated per prompt; a row stops early at the EOS token.
        batch_size: prompts per forward pass (grouped by length to reduce padding).
        temperature: 0 for greedy decoding, otherwise sampling at this temperature.
        system: optional system message for the chat template.
        seed: seed of the sampling generator (unused when greedy).
        progress: show a progress bar.
        chat: wrap prompts in the chat template (``False`` continues raw text).
        share_prefix: run the tokens every prompt of a batch starts with (the chat template's system turn)
            once and continue each row from their cached keys and values; the rest of each prompt is
            left-padded after them. ``False`` runs every whole prompt in one left-padded pass.

    Returns:
        The decoded responses without the prompt and without special tokens.
    """
    if max_new_tokens < 1:
        raise MechsafeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise MechsafeError(f"temperature must be >= 0, got {temperature}")
    if not prompts:
        return []
    tok = model.tokenizer
    enc = encode_prompts(tok, list(prompts), system=system, chat=chat)
    eos = tok.eos_token_id
    gen = torch.Generator().manual_seed(int(seed))
    results: list[str] = [""] * len(enc)
    batches = list(length_batches([len(e) for e in enc], batch_size))
    with torch.inference_mode():
        for idx in tqdm(batches, desc="generating", unit="batch", disable=not progress):
            outs = _generate_batch(model, [enc[i].ids for i in idx], max_new_tokens, temperature, eos,
                                   pad_id(tok), gen, share_prefix)
            for i, ids in zip(idx, outs):
                results[i] = tok.decode(ids, skip_special_tokens=True)
    return results


def cached_answers(model: HookedTransformer, prompts: Sequence[dict[str, str]], max_new_tokens: int, path: str | Path,
                   batch_size: int = 32, progress: bool = True) -> dict[str, str]:
    """The model's greedy answers to ``prompts`` (dicts with ``id`` and ``text``) by id, cached in the JSON file ``path``.

    The cache is keyed by the model (:func:`mechsafe.models.model_info`); prompts already answered are not
    generated again. Greedy decoding is deterministic, so answers cached with a larger token limit are cut to
    ``max_new_tokens`` tokens instead of being generated again.
    """
    path = Path(path)
    key = stable_hash({"model": model_info(model).to_dict()})
    cached: dict[str, str] = {}
    cached_limit = max_new_tokens
    if path.is_file():
        data = read_json(path)
        if data.get("key") == key and int(data.get("max_new_tokens", 0)) >= max_new_tokens:
            cached, cached_limit = dict(data["answers"]), int(data["max_new_tokens"])
    todo = [p for p in prompts if p["id"] not in cached]
    if todo:
        texts = generate(model, [p["text"] for p in todo], max_new_tokens=cached_limit, batch_size=batch_size,
                         progress=progress)
        cached.update({p["id"]: t for p, t in zip(todo, texts)})
        write_json(path, {"key": key, "max_new_tokens": cached_limit, "answers": cached})
    out = {p["id"]: cached[p["id"]] for p in prompts}
    if cached_limit > max_new_tokens:
        tok = model.tokenizer
        for i, text in out.items():
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) > max_new_tokens:
                out[i] = tok.decode(ids[:max_new_tokens], skip_special_tokens=True)
    return out
