"""What an SAE latent does: its top-activating tokens in a dataset and its direct effect on the logits.

* Top activations: every token of the prompts (chat template included, position 0 and the shared
  template prefix excluded as in the activation store) is encoded; the highest activations are listed
  with their prompt, the token and a few tokens of context.
* Logit effect: the latent's decoder direction carried to the unembedding, ``W_dec[f] @ W_U`` —
  multiplied by the final norm's scale first when the model has one (unfolded weights), and through
  ``W_out`` / ``W_O`` for MLP-neuron and attention-``z`` hooks. It ignores everything between the hook
  and the unembedding (later layers, the norm's division), so it is the latent's *direct* effect.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from mechsafe import chat
from mechsafe.activations import ActivationConfig, cache_activations
from mechsafe.data import PromptSet
from mechsafe.errors import MechsafeError
from mechsafe.hooks import check_hook, kind_of, layer_of
from mechsafe.sae.load import LoadedSAE, as_loaded
from mechsafe.weights import weight


@dataclasses.dataclass
class FeatureReport:
    """One latent: where it fires most and which tokens it promotes or suppresses directly."""

    feature: int
    """Latent index."""
    frequency: float | None
    """Fraction of the dataset's tokens on which it fires (``None`` without a dataset)."""
    top_examples: list[dict]
    """Highest activations: ``prompt`` (index), ``text`` (the prompt), ``token``, ``context``, ``activation``."""
    logit_top: list[tuple[str, float]]
    """Tokens whose logits the decoder direction raises most."""
    logit_bottom: list[tuple[str, float]]
    """Tokens whose logits it lowers most."""

    def markdown(self) -> str:
        freq = "n/a" if self.frequency is None else f"{100 * self.frequency:.2f}% of tokens"
        lines = [f"### Feature {self.feature} (fires on {freq})", ""]
        if self.top_examples:
            lines += ["| activation | token | context |", "|---|---|---|"]
            for ex in self.top_examples:
                ctx = ex["context"].replace("|", "\\|").replace("\n", "⏎")
                tok = ex["token"].replace("|", "\\|").replace("\n", "⏎")
                lines.append(f"| {ex['activation']:.2f} | `{tok}` | {ctx} |")
            lines.append("")
        top = ", ".join(f"`{t.strip() or repr(t)}` ({v:+.2f})" for t, v in self.logit_top)
        bottom = ", ".join(f"`{t.strip() or repr(t)}` ({v:+.2f})" for t, v in self.logit_bottom)
        lines += [f"- promotes: {top}", f"- suppresses: {bottom}", ""]
        return "\n".join(lines)


def decoder_in_residual(model: HookedTransformer, sae: LoadedSAE) -> Float[torch.Tensor, "d_sae d_model"]:
    """Each latent's decoder direction expressed in the residual stream."""
    name = check_hook(model, sae.hook_name)
    kind, layer = kind_of(name), layer_of(name)
    W_dec = sae.W_dec.detach().float().cpu()
    if kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
        return W_dec
    if kind == "mlp_post":
        return W_dec @ weight(model, "mlp.W_out", layer).parameter.detach().float().cpu()
    if kind == "attn_z":
        handle = weight(model, "attn.W_O", layer)  # [n_heads, d_head, d_model] as [n_heads * d_head, d_model]
        return W_dec @ handle.as_matrix(handle.parameter.detach().float().cpu())
    raise MechsafeError(f"the logit effect of a {kind} latent is not defined; use a residual, attn_out, mlp_out, "
                        "mlp_post or attn_z SAE")


@torch.no_grad()
def logit_effect(model: HookedTransformer, sae, features: Sequence[int] | None = None) -> Float[torch.Tensor, "n d_vocab"]:
    """Direct logit effect of each latent in ``features`` (all latents when ``None``): ``W_dec[f] @ W_U``."""
    loaded = as_loaded(sae)
    directions = decoder_in_residual(model, loaded)
    if features is not None:
        directions = directions[_check_features(loaded, features)]
    scale = getattr(model.ln_final, "w", None) if getattr(model, "ln_final", None) is not None else None
    if scale is not None:
        directions = directions * scale.detach().float().cpu()
    return directions @ model.W_U.detach().float().cpu()


def _check_features(sae: LoadedSAE, features: Sequence[int]) -> list[int]:
    feats = [int(f) for f in features]
    bad = [f for f in feats if not 0 <= f < sae.d_sae]
    if bad or not feats:
        raise MechsafeError(f"feature indices {bad or feats} are out of range; this SAE has latents 0-{sae.d_sae - 1}")
    return feats


def _tok(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids))


@torch.no_grad()
def inspect_features(model: HookedTransformer, sae, features: Sequence[int], prompts: PromptSet | Sequence[str] | None = None,
                     *, top_n: int = 8, n_logits: int = 10, context: int = 6, activation_root: str | os.PathLike | None = None,
                     max_length: int = 512, progress: bool = False) -> list[FeatureReport]:
    """Reports for ``features``: top-activating tokens in ``prompts`` (if given) and direct logit effects."""
    loaded = as_loaded(sae)
    feats = _check_features(loaded, features)
    tokenizer = model.tokenizer
    effects = logit_effect(model, loaded, feats)
    n_logits = min(n_logits, effects.shape[1])
    reports: dict[int, FeatureReport] = {}
    for row, f in enumerate(feats):
        top = torch.topk(effects[row], n_logits)
        bottom = torch.topk(-effects[row], n_logits)
        reports[f] = FeatureReport(
            feature=f, frequency=None, top_examples=[],
            logit_top=[(_tok(tokenizer, [int(i)]), float(v)) for v, i in zip(top.values, top.indices)],
            logit_bottom=[(_tok(tokenizer, [int(i)]), -float(v)) for v, i in zip(bottom.values, bottom.indices)])
    if prompts is None:
        return [reports[f] for f in feats]
    texts = list(prompts.texts if isinstance(prompts, PromptSet) else prompts)
    if not texts:
        raise MechsafeError("no prompts to find top activations in")
    name = loaded.hook_name
    cfg = ActivationConfig(hook=kind_of(name), layers=str(layer_of(name)), pooling=("tokens",), max_length=max_length)
    store = cache_activations(model, texts, cfg, root=activation_root, progress=progress)
    encoded = chat.encode_prompts(tokenizer, texts, max_length=max_length)
    values, where, n_tokens, n_fired = [], [], 0, torch.zeros(len(feats))
    for acts, prompt_idx, position in store.iter_tokens(name):
        f_all = loaded.encode(acts.reshape(acts.shape[0], -1).to(loaded.sae.device)).float().cpu()[:, feats]
        n_tokens += f_all.shape[0]
        n_fired += (f_all > 0).sum(0)
        k = min(top_n, f_all.shape[0])
        v, i = torch.topk(f_all, k, dim=0)  # [k, n_feats]
        values.append(v)
        where.append(torch.stack([prompt_idx[i], position[i]], dim=-1))  # [k, n_feats, 2]
    values_all, where_all = torch.cat(values), torch.cat(where)
    for col, f in enumerate(feats):
        rep = reports[f]
        rep.frequency = float(n_fired[col] / max(n_tokens, 1))
        order = torch.argsort(values_all[:, col], descending=True)[:top_n]
        for j in order.tolist():
            act = float(values_all[j, col])
            if act <= 0:
                break
            p, pos = (int(x) for x in where_all[j, col])
            ids = encoded[p].ids
            rep.top_examples.append({
                "prompt": p, "text": texts[p], "token": _tok(tokenizer, [ids[pos]]), "activation": act,
                "context": _tok(tokenizer, ids[max(0, pos - context):pos]) + "«" + _tok(tokenizer, [ids[pos]]) + "»"
                + _tok(tokenizer, ids[pos + 1:pos + 3]),
            })
    return [reports[f] for f in feats]


@torch.no_grad()
def latents_on_text(model: HookedTransformer, sae, text: str, top: int = 10, system: str | None = None,
                    max_length: int = 512) -> list[dict[str, Any]]:
    """The latents that fire on the user's text of one chat-formatted prompt, strongest first.

    Only the tokens of ``text`` itself count: the chat template and the system prompt around it are excluded. Each
    entry: ``latent``, ``max`` (its largest activation), ``token`` (where it peaks), ``n_tokens`` (content tokens it
    fires on) and ``mean`` (its mean over the content tokens).
    """
    loaded = as_loaded(sae)
    if not text.strip():
        raise MechsafeError("the prompt is empty; pass some text to inspect")
    name = check_hook(model, loaded.hook_name)
    (enc,) = chat.encode_prompts(model.tokenizer, [text], system=system, max_length=max_length)
    start, stop = enc.content
    _, cache = model.run_with_cache(torch.tensor([enc.ids], device=model.cfg.device), names_filter=[name],
                                    stop_at_layer=layer_of(name) + 1)
    acts = cache[name][0, start:stop]
    f = loaded.encode(acts.reshape(acts.shape[0], -1).to(loaded.sae.device)).float().cpu()  # [content tokens, d_sae]
    peak, where = f.max(0)
    fired = (f > 0).sum(0)
    order = [int(i) for i in torch.argsort(peak, descending=True)[:top] if peak[i] > 0]
    return [{"latent": i, "max": float(peak[i]), "token": _tok(model.tokenizer, [enc.ids[start + int(where[i])]]),
             "n_tokens": int(fired[i]), "mean": float(f[:, i].mean())} for i in order]
