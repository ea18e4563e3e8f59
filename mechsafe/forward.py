"""Forward passes every layer above shares: unembedding, prefix key-value caches, teacher-forced NLL.

Teacher forcing: a sequence is the chat-formatted prompt (:func:`mechsafe.chat.format_prompt`, assistant
turn opened), an optional prefix (the unscored opening of the response) and the response, followed by
:func:`mechsafe.chat.end_of_turn`. The three are tokenized separately and concatenated, so the boundaries
between them are exact. The NLL counts the response tokens only (prompt and prefix are masked); padding
is right padding tracked by lengths, never by token id. For a batch with response masks ``m[b, t]``
(1 where token ``t`` of row ``b`` is a response token)::

    NLL = - sum_{b,t} m[b, t] * log p(x[b, t] | x[b, <t]) / sum_{b,t} m[b, t]

Key-value caches: a prefix that many rows share (the chat template's system turn, or a whole prompt with
several responses) runs once into a TransformerLens key-value cache that every row continues from;
gradients flow through the cache, so losses and gradients equal those of full passes up to
floating-point summation order.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from mechsafe import chat
from mechsafe.errors import MechsafeError

def unembed(model: HookedTransformer, resid: Float[torch.Tensor, "n d_model"]) -> Float[torch.Tensor, "n d_vocab"]:
    """Final norm, unembedding and logit soft cap of residual vectors (only the positions that are needed).

    Always in the model's own dtype, also under ``torch.autocast``: bfloat16 logits would round by up to
    0.1 at typical magnitudes, more than the log-probability differences the losses work with.
    """
    x = resid.unsqueeze(1).to(model.cfg.dtype)
    with torch.autocast(resid.device.type, enabled=False):
        if model.cfg.normalization_type is not None:
            x = model.ln_final(x)
        logits = model.unembed(x).squeeze(1)  # (a view: its backward copies nothing, unlike [:, 0])
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def last_logits(model: HookedTransformer, tokens: Int[torch.Tensor, "batch pos"],
                lengths: Int[torch.Tensor, " batch"]) -> Float[torch.Tensor, "batch d_vocab"]:
    """Next-token logits at each row's last real position of a right-padded batch.

    Only those positions are unembedded, which saves the vocabulary projection of every other one.
    """
    resid = model(tokens.to(model.cfg.device), stop_at_layer=model.cfg.n_layers)
    rows = torch.arange(tokens.shape[0], device=resid.device)
    return unembed(model, resid[rows, lengths.to(resid.device) - 1])


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Number of leading tokens all sequences share (at most the shortest length minus one)."""
    if not seqs:
        return 0
    limit = min(len(s) for s in seqs) - 1
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def select_cache_rows(cache: TransformerLensKeyValueCache, rows: Int[torch.Tensor, " n"]) -> None:
    """Make ``cache`` hold, for each of ``n`` new rows, the keys, values and attention mask of row ``rows[i]``
    (in place; differentiable, so gradients flow back to the pass that filled the cache)."""
    for entry in cache.entries:
        entry.past_keys = entry.past_keys.index_select(0, rows.to(entry.past_keys.device))
        entry.past_values = entry.past_values.index_select(0, rows.to(entry.past_values.device))
    cache.previous_attention_mask = cache.previous_attention_mask.index_select(
        0, rows.to(cache.previous_attention_mask.device))


def prefix_cache(model: HookedTransformer, prefix: Sequence[int], rows: int
                 ) -> tuple[TransformerLensKeyValueCache, Float[torch.Tensor, "1 prefix d_model"]]:
    """Run the tokens ``prefix`` once (batch 1) into a new key-value cache and give each of ``rows`` rows a copy of
    their keys and values; returns the cache and the prefix's final residuals (hooks apply to this pass)."""
    device = model.cfg.device
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, 1)
    head = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    resid = model(head, attention_mask=torch.ones_like(head, dtype=torch.int), past_kv_cache=cache,
                  stop_at_layer=model.cfg.n_layers)
    select_cache_rows(cache, torch.zeros(rows, dtype=torch.long))
    return cache, resid


@dataclasses.dataclass
class TeacherForced:
    """One tokenized (prompt, response) pair."""

    ids: list[int]
    """Prompt tokens followed by response tokens (end of turn included)."""
    prompt_len: int
    """Number of prompt tokens: ``ids[prompt_len:]`` is the response."""

    def __len__(self) -> int:
        return len(self.ids)


def check_examples(examples: Sequence[tuple]) -> list[tuple[str, str, bool, str]]:
    """Validate examples: ``(prompt, response)`` pairs of non-empty strings, optionally with a third
    element ``close_turn`` (default True; False for a response cut short, which must not be taught
    to end the turn) and a fourth, ``prefix`` (default ``""``): text that opens the response and is
    teacher-forced but not scored, so the loss covers only what follows it (``response`` continues it
    directly: include a leading space where one belongs). Returns ``(prompt, response, close_turn,
    prefix)`` tuples."""
    if not examples:
        raise MechsafeError("no (prompt, response) examples to train on; pass a non-empty list")
    out = []
    for i, ex in enumerate(examples):
        ok = isinstance(ex, (tuple, list)) and len(ex) in (2, 3, 4) and all(isinstance(s, str) and s.strip() for s in ex[:2])
        if not ok or (len(ex) >= 3 and not isinstance(ex[2], bool)) or (len(ex) == 4 and not isinstance(ex[3], str)):
            raise MechsafeError(f"example {i} is not a (prompt, response[, close_turn[, prefix]]) tuple of non-empty "
                                "strings; fix the data")
        out.append((ex[0], ex[1], bool(ex[2]) if len(ex) >= 3 else True, ex[3] if len(ex) == 4 else ""))
    return out


def encode_examples(tokenizer, examples: Sequence[tuple], max_length: int = 256,
                    system: str | None = None) -> list[TeacherForced]:
    """Tokenize (prompt, response[, close_turn[, prefix]]) examples for teacher forcing.

    A pair longer than ``max_length`` keeps its prompt (its user text trimmed from the start when
    the prompt alone leaves no room, like :func:`mechsafe.chat.encode_prompts`) and loses the end
    of its response; at least one response token always remains. A prefix counts as part of the
    prompt (``prompt_len`` includes it), so it is never scored.
    """
    examples = check_examples(examples)
    if max_length < 2:
        raise MechsafeError(f"max_length={max_length} leaves no room for a response; raise it")
    eot = chat.end_of_turn(tokenizer)
    prompts = chat.encode_prompts(tokenizer, [ex[0] for ex in examples], system=system, max_length=max_length - 1)
    out = []
    for i, (enc, (_, response, close_turn, prefix)) in enumerate(zip(prompts, examples)):
        head = list(enc.ids) + (list(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else [])
        if len(head) >= max_length:
            raise MechsafeError(f"example {i}: its prompt and prefix fill max_length={max_length} tokens; "
                                "raise max_length or shorten the prefix")
        resp = tokenizer(response + (eot if close_turn else ""), add_special_tokens=False)["input_ids"]
        out.append(TeacherForced(ids=head + list(resp)[: max_length - len(head)], prompt_len=len(head)))
    return out


def collate(seqs: Sequence[TeacherForced], pad_id: int) -> tuple[Int[torch.Tensor, "batch pos"], Float[torch.Tensor, "batch pos_minus_1"]]:
    """Right-padded tokens and the mask of positions whose *next* token is a response token.

    ``mask[b, t] = 1`` when ``tokens[b, t + 1]`` is a response token of row ``b`` (so the logits at
    ``t`` are scored); prompt and padding positions are 0.
    """
    tokens, lengths = chat.pad_right([s.ids for s in seqs], pad_id)
    n_pos = tokens.shape[1]
    target_pos = torch.arange(1, n_pos)
    starts = torch.tensor([s.prompt_len for s in seqs])
    mask = (target_pos[None, :] >= starts[:, None]) & (target_pos[None, :] < lengths[:, None])
    return tokens, mask.float()


def token_nll(model: HookedTransformer, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos_minus_1"]:
    """``-log p(tokens[:, t + 1] | tokens[:, :t + 1])`` for every position ``t``."""
    logits = model(tokens.to(model.cfg.device), return_type="logits")[:, :-1]
    target = tokens[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                            reduction="none")
    return nll.view(target.shape)


def final_resid(model: HookedTransformer, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos_minus_1 d_model"]:
    """The residual stream after the last block at every position that predicts a next token."""
    return model(tokens.to(model.cfg.device), stop_at_layer=model.cfg.n_layers)[:, :-1]


def shared_prompt_resid(model: HookedTransformer, seqs: Sequence[TeacherForced], pad_id: int
                        ) -> tuple[Int[torch.Tensor, "batch pos"], Float[torch.Tensor, "batch pos_minus_1"],
                                   Float[torch.Tensor, "batch pos_minus_1 d_model"]]:
    """``collate(seqs, pad_id)`` and the residuals ``final_resid`` gives for it, computed with each
    distinct prompt run once.

    Rows that share a prompt (an example's response, its negative, its rejected response) differ only
    after it. The tokens every distinct prompt starts with (the chat template's system turn) run once, into
    a TransformerLens key-value cache; the rest of the distinct prompts run in one pass from it (right-padded,
    with an attention mask, so no row attends to another's padding); every row's response then runs in a
    third pass from its prompt's cached keys and values. Gradients flow through the cache into the earlier
    passes, so losses and gradients are those of the single pass (up to floating-point summation order), at
    the cost of one prompt pass instead of one per row. The residuals agree with ``final_resid`` at every
    position before each row's end; positions after it are padding.
    """
    tokens, mask = collate(seqs, pad_id)
    device = model.cfg.device
    heads: dict[tuple[int, ...], int] = {}
    head_of = torch.tensor([heads.setdefault(tuple(s.ids[:s.prompt_len]), len(heads)) for s in seqs])
    n_common = common_prefix_length(list(heads)) if len(heads) > 1 else 0
    parts = []
    if n_common:  # the common prefix once, then every distinct prompt continues from it
        cache, common = prefix_cache(model, next(iter(heads))[:n_common], len(heads))
        parts.append(common.expand(len(heads), -1, -1))
    else:
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(heads))
    head_tokens, head_len = chat.pad_right([h[n_common:] for h in heads], pad_id)
    head_mask = (torch.arange(head_tokens.shape[1])[None, :] < head_len[:, None]).to(torch.int)
    parts.append(model(head_tokens.to(device), attention_mask=head_mask.to(device), past_kv_cache=cache,
                       stop_at_layer=model.cfg.n_layers))
    resid = torch.cat(parts, dim=1).index_select(0, head_of.to(device))
    n_head_pos = resid.shape[1]
    prompt_len = torch.tensor([s.prompt_len for s in seqs])[:, None]
    if any(len(s) > s.prompt_len for s in seqs):
        select_cache_rows(cache, head_of)  # each row continues from its own prompt's keys and values
        tails, tail_len = chat.pad_right([s.ids[s.prompt_len:] for s in seqs], pad_id)
        tail_mask = (torch.arange(tails.shape[1])[None, :] < tail_len[:, None]).to(torch.int)
        resid = torch.cat([resid, model(tails.to(device), attention_mask=tail_mask.to(device), past_kv_cache=cache,
                                        stop_at_layer=model.cfg.n_layers)], dim=1)
    # position t of a row is its prompt's position t before prompt_len, else its response's t - prompt_len
    pos = torch.arange(tokens.shape[1] - 1)[None, :]
    src = torch.where(pos < prompt_len, pos, n_head_pos + pos - prompt_len).clamp(max=resid.shape[1] - 1)
    return tokens, mask, resid.gather(1, src.to(device)[..., None].expand(-1, -1, resid.shape[-1]))


def masked_nll(model: HookedTransformer, tokens: Int[torch.Tensor, "batch pos"],
               mask: Float[torch.Tensor, "batch pos_minus_1"],
               resid: Float[torch.Tensor, "batch pos_minus_1 d_model"] | None = None) -> Float[torch.Tensor, " batch"]:
    """Summed NLL of the scored positions of each row (``mask`` from :func:`collate`).

    Equal to ``(token_nll(model, tokens) * mask).sum(1)``, but the unembedding (a ``d_vocab``-wide
    matrix product) runs only at the scored positions, which saves most of its cost on the prompt.
    ``resid`` (from :func:`final_resid`) skips the forward pass when the caller already ran it.
    """
    device = model.cfg.device
    resid = final_resid(model, tokens) if resid is None else resid
    sel = mask.to(device).bool()
    logits = unembed(model, resid[sel])
    nll = torch.nn.functional.cross_entropy(logits.float(), tokens[:, 1:].to(device)[sel], reduction="none")
    rows = torch.arange(tokens.shape[0], device=device)[:, None].expand_as(sel)[sel]
    return torch.zeros(tokens.shape[0], device=device, dtype=nll.dtype).index_add(0, rows, nll)


@contextlib.contextmanager
def eval_mode(model: HookedTransformer) -> Iterator[HookedTransformer]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def sequence_nll(model: HookedTransformer, seqs: Sequence[TeacherForced], batch_size: int = 8,
                 share_prompts: bool = False) -> tuple[Float[torch.Tensor, " n"], Int[torch.Tensor, " n"]]:
    """Summed NLL of each sequence's response tokens (prompt masked), in eval mode, and the number of
    those tokens. Sequences are batched longest first, so rows of similar length share a batch; with
    ``share_prompts`` rows with the same prompt are batched together and each prompt runs once
    (:func:`shared_prompt_resid`)."""
    if batch_size < 1:
        raise MechsafeError(f"batch_size={batch_size} must be a positive integer")
    pad = chat.pad_id(model.tokenizer)
    total, count = torch.empty(len(seqs)), torch.empty(len(seqs), dtype=torch.long)
    if share_prompts:
        order = sorted(range(len(seqs)), key=lambda i: (-seqs[i].prompt_len, seqs[i].ids[:seqs[i].prompt_len], -len(seqs[i])))
    else:
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    with eval_mode(model):
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            rows = [seqs[i] for i in idx]
            if share_prompts:
                tokens, mask, resid = shared_prompt_resid(model, rows, pad)
            else:
                (tokens, mask), resid = collate(rows, pad), None
            total[idx] = masked_nll(model, tokens, mask, resid=resid).cpu()
            count[idx] = mask.sum(1).long()
    return total, count


def response_nll(model: HookedTransformer, examples: Sequence[tuple], batch_size: int = 8,
                 max_length: int = 256, system: str | None = None) -> Float[torch.Tensor, " n_examples"]:
    """Mean NLL per response token of each (prompt, response) pair (prompt tokens masked).

    The training loss of :func:`mechsafe.finetune.finetune` is the token-weighted mean of these.
    """
    total, count = sequence_nll(model, encode_examples(model.tokenizer, examples, max_length=max_length, system=system),
                                batch_size)
    return total / count
