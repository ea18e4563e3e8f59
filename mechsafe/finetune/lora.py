"""Attaching LoRA adapters to a ``HookedTransformer`` through PEFT, and merging them back.

TransformerLens keeps its weights as bare ``nn.Parameter`` s (``mlp.W_in`` is ``[d_model, d_mlp]``,
``attn.W_Q`` is ``[n_heads, d_model, d_head]``), not ``nn.Linear`` layers, so LoRA targets
*parameters*:

* **MLP weights** go through PEFT's own ``LoraConfig(target_parameters=[...])``: PEFT wraps the MLP
  module in (nested) ``lora.ParamWrapper`` s that add ``scale * B @ A`` to each weight for the
  duration of the forward. TransformerLens calls the MLP with one positional argument, which is
  what ``ParamWrapper.forward(x, ...)`` expects.
* **Attention weights** cannot use ``ParamWrapper``: TransformerLens calls attention with keyword
  arguments only (``attn(query_input=..., key_input=..., value_input=..., ...)``), while
  ``ParamWrapper.forward(x, *args, **kwargs)`` needs a positional ``x`` and raises ``TypeError``.
  mechsafe registers its own LoRA layer, :class:`AttentionLora`, for TransformerLens attention
  modules through PEFT's custom-module extension point (``LoraConfig._register_custom_module``)
  and targets those modules with ``target_modules``. One ``AttentionLora`` adapts any of the
  module's ``W_Q``, ``_W_K``, ``_W_V`` and ``W_O`` at once (no nesting) and passes every argument
  through unchanged, keywords included.

Both kinds live in one PEFT ``LoraModel``: PEFT marks only the LoRA factors trainable, and
``LoraModel.merge_and_unload()`` folds every adapter into its weight and puts the original
TransformerLens modules back, so a merged model is a plain ``HookedTransformer``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import torch
from jaxtyping import Float
from torch import nn
from transformer_lens import HookedTransformer
from transformer_lens.components.abstract_attention import AbstractAttention

from mechsafe.errors import MechsafeError
from mechsafe.finetune.config import FinetuneConfig
from mechsafe.hooks import parse_layers
from mechsafe.models import linear_layout

ADAPTER = "default"
"""Name of the one adapter mechsafe trains."""

_QKV = ("W_Q", "_W_K", "_W_V", "W_K", "W_V")  # [heads, d_model, d_head]: input d_model, output heads x d_head
_OUT = ("W_O",)  # [heads, d_head, d_model]: input heads x d_head, output d_model


def _lora_layer_cls():
    from peft.tuners.lora.layer import LoraLayer

    return LoraLayer


def _attention_weight_dims(name: str, shape: torch.Size) -> tuple[int, int]:
    """(in_features, out_features) of a 3-D attention weight seen as one linear map."""
    heads, a, b = shape
    if name in _QKV:
        return a, heads * b
    if name in _OUT:
        return heads * a, b
    raise MechsafeError(f"attention weight {name!r} cannot take LoRA; use one of W_Q, W_K, W_V, W_O")


def _make_attention_lora_cls():
    """Build :class:`AttentionLora` (PEFT is imported lazily: no import cost for ``import mechsafe``)."""
    from peft.tuners.tuners_utils import check_adapters_to_merge

    LoraLayer = _lora_layer_cls()

    class AttentionLora(nn.Module, LoraLayer):
        """LoRA on the weights of a TransformerLens attention module, called with keyword arguments.

        Each adapted weight gets factors ``A`` [r, in] and ``B`` [out, r] (``B`` starts at zero,
        so the adapter starts as the identity); the update ``scale * B @ A`` is reshaped to the
        weight's TransformerLens shape: ``W_Q``/``_W_K``/``_W_V`` map ``d_model -> heads * d_head``,
        ``W_O`` maps ``heads * d_head -> d_model``. The forward runs the wrapped module with the
        updated weights (``torch.func.functional_call``), passing every argument through, so
        TransformerLens's keyword-only call works and every hook point inside still fires.
        """

        adapter_layer_names = ("lora_A", "lora_B")

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: float = 1,
                     weights: tuple[str, ...] = ("W_Q", "W_O"), **kwargs: Any) -> None:
            super().__init__()
            kwargs.pop("parameter_name", None)
            LoraLayer.__init__(self, base_layer, **kwargs)
            self.weights = tuple(weights)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module: nn.Module) -> tuple[None, None]:
            return None, None  # several weights of different shapes: no single in/out size

        def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs: Any) -> None:
            if r <= 0:
                raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
            if config.lora_dropout:
                raise ValueError("AttentionLora does not support lora_dropout (parameter LoRA)")
            base = self.get_base_layer()
            self.r[adapter_name] = r
            self.lora_alpha[adapter_name] = lora_alpha
            self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
            self.use_rslora[adapter_name] = config.use_rslora
            self.lora_dropout[adapter_name] = nn.Identity()
            a_dict, b_dict = nn.ParameterDict(), nn.ParameterDict()
            for name in self.weights:
                weight = getattr(base, name)
                n_in, n_out = _attention_weight_dims(name, weight.shape)
                a = torch.empty(r, n_in, dtype=weight.dtype, device=weight.device)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # the initialization of PEFT's lora_A
                a_dict[name] = nn.Parameter(a)
                b_dict[name] = nn.Parameter(torch.zeros(n_out, r, dtype=weight.dtype, device=weight.device))
            self.lora_A[adapter_name] = a_dict
            self.lora_B[adapter_name] = b_dict
            self.set_adapter(self.active_adapters)

        def get_delta_weight(self, adapter_name: str, name: str) -> torch.Tensor:
            """The update of weight ``name`` in its TransformerLens shape."""
            weight = getattr(self.get_base_layer(), name)
            heads, a, b = weight.shape
            delta = (self.lora_B[adapter_name][name] @ self.lora_A[adapter_name][name]) * self.scaling[adapter_name]
            if name in _QKV:  # delta: [heads*d_head, d_model] -> [heads, d_model, d_head]
                return delta.reshape(heads, b, a).transpose(1, 2).to(weight.dtype)
            return delta.T.reshape(heads, a, b).to(weight.dtype)  # [d_model, heads*d_head] -> [heads, d_head, d_model]

        def _adapted_weights(self) -> dict[str, torch.Tensor]:
            base = self.get_base_layer()
            out = {}
            for name in self.weights:
                deltas = [self.get_delta_weight(ad, name) for ad in self.active_adapters if ad in self.lora_A]
                if deltas:
                    out[name] = getattr(base, name) + sum(deltas)
            return out

        def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            base = self.base_layer
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return base(*args, **kwargs)
            if self.merged:
                return base(*args, **kwargs)
            return torch.func.functional_call(base, self._adapted_weights(), args, kwargs)

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            base = self.get_base_layer()
            for adapter in check_adapters_to_merge(self, adapter_names):
                if adapter not in self.lora_A:
                    continue
                for name in self.weights:
                    param = getattr(base, name)
                    merged = param.data + self.get_delta_weight(adapter, name)
                    if safe_merge and not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs in the merged {name}; the adapter {adapter} is broken")
                    param.data = merged
                self.merged_adapters.append(adapter)

        def unmerge(self) -> None:
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.")
                return
            base = self.get_base_layer()
            while self.merged_adapters:
                adapter = self.merged_adapters.pop()
                if adapter in self.lora_A:
                    for name in self.weights:
                        getattr(base, name).data -= self.get_delta_weight(adapter, name)

        def __repr__(self) -> str:
            return f"mechsafe.AttentionLora(weights={list(self.weights)}, base_layer={self.base_layer!r})"

    return AttentionLora


@functools.lru_cache(maxsize=1)
def attention_lora_cls() -> type:
    """The :class:`AttentionLora` class (a PEFT ``LoraLayer``), built on first use."""
    return _make_attention_lora_cls()


def _attention_param_name(model: HookedTransformer, target: str) -> str:
    """TransformerLens attribute holding ``attn.W_K``/``attn.W_V`` (``_W_K`` under grouped-query attention)."""
    short = target.split(".", 1)[1]
    attn = model.blocks[0].attn
    while hasattr(attn, "base_layer"):  # already carrying adapters
        attn = attn.base_layer
    names = dict(attn.named_parameters(recurse=False))
    if short in names:
        return short
    if f"_{short}" in names:
        return f"_{short}"
    raise MechsafeError(f"this model's attention has no weight {short}; its weights are {sorted(names)}")


def peft_config(model: HookedTransformer, config: FinetuneConfig):
    """The PEFT ``LoraConfig`` for ``config`` on ``model`` (MLP parameters + mechsafe attention layers)."""
    from peft import LoraConfig

    layers = parse_layers(config.layers, model.cfg.n_layers)
    mlp = [t for t in config.targets if t.startswith("mlp.")]
    attn = [_attention_param_name(model, t) for t in config.targets if t.startswith("attn.")]
    if model.cfg.attn_only and mlp:
        raise MechsafeError(f"this model has no MLPs; drop {mlp} from the LoRA targets")
    if mlp and not model.cfg.gated_mlp and "mlp.W_gate" in mlp:
        raise MechsafeError("this model's MLP is not gated (no W_gate); drop mlp.W_gate from the LoRA targets")
    target_parameters = [f"blocks.{i}.{t}" for i in layers for t in mlp]
    target_modules: Any = [] if not attn else rf"blocks\.({'|'.join(str(i) for i in layers)})\.attn"
    lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, bias="none",
                             target_modules=target_modules, target_parameters=target_parameters or None)
    if attn:
        lora_config._register_custom_module({AbstractAttention: functools.partial(attention_lora_cls(), weights=tuple(attn))})
    return lora_config


def attach_lora(model: HookedTransformer, config: FinetuneConfig):
    """Wrap ``model``'s targeted weights with LoRA adapters in place; returns PEFT's ``LoraModel``.

    The adapters start with ``B = 0``, so the model's outputs are unchanged. Only the LoRA factors
    are trainable afterwards. The same ``model`` object keeps working (hooks included); undo with
    :func:`merge_lora`.
    """
    from peft.tuners.lora import LoraModel

    if has_lora(model):
        raise MechsafeError("this model already carries LoRA adapters; merge them first (merge_lora) or reload it")
    lora_config = peft_config(model, config)
    order = {name: list(m._parameters) for name, m in model.named_modules() if m._parameters}
    torch.manual_seed(config.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuner = LoraModel(model, lora_config, ADAPTER)
    tuner.mechsafe_parameter_order = order  # PEFT's parametrizations re-register weights at the end
    return tuner


def merge_lora(tuner) -> HookedTransformer:
    """Fold the adapters into the weights and remove every PEFT wrapper; returns the plain model."""
    with torch.no_grad():
        model = tuner.merge_and_unload()
    return _unwrapped(tuner, model)


def remove_lora(tuner) -> HookedTransformer:
    """Remove every adapter without merging: the model gets its original weights back."""
    return _unwrapped(tuner, tuner.unload())


def _unwrapped(tuner, model: HookedTransformer) -> HookedTransformer:
    if has_lora(model):
        raise MechsafeError("unloading left PEFT modules in the model; report this as a mechsafe bug")
    order = getattr(tuner, "mechsafe_parameter_order", {})
    for name, module in model.named_modules():  # restore the original parameter order (state_dict order)
        if name in order and set(order[name]) == set(module._parameters):
            module._parameters = type(module._parameters)((k, module._parameters[k]) for k in order[name])
    return linear_layout(model)  # merged weights are new tensors


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` contains any PEFT tuner layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def lora_state(model: nn.Module) -> dict[str, Float[torch.Tensor, "..."]]:
    """The trainable LoRA factors by parameter name (detached copies)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved LoRA factors into ``model``'s adapters (names must match :func:`lora_state`)."""
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise MechsafeError(f"saved adapter does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
                            "resume with the same targets and layers, or start a new run dir")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def adapted_weight(model: HookedTransformer, target: str, layer: int) -> torch.Tensor:
    """The weight ``target`` (e.g. ``"mlp.W_in"``) of block ``layer`` with its LoRA update included.

    Works on a plain model (returns the weight) and on one carrying adapters (base weight plus
    ``scale * B @ A`` in TransformerLens shape), e.g. inside a :func:`~mechsafe.finetune.finetune`
    callback that snapshots neuron weights.
    """
    from peft.tuners.lora.layer import ParamWrapper

    kind, _, short = target.partition(".")
    if kind not in ("mlp", "attn") or not short:
        raise MechsafeError(f"target {target!r} must look like 'mlp.W_in' or 'attn.W_O'")
    if not 0 <= layer < model.cfg.n_layers:
        raise MechsafeError(f"layer {layer} is out of range; the model has {model.cfg.n_layers} layers")
    module = getattr(model.blocks[layer], kind)
    if kind == "attn":
        short = _attention_param_name(model, target)
    delta = None
    while isinstance(module, _lora_layer_cls()):
        if isinstance(module, ParamWrapper) and module.parameter_name == short and ADAPTER in module.lora_A:
            delta = module.get_delta_weight(ADAPTER)
        elif getattr(module, "weights", None) and short in module.weights and ADAPTER in module.lora_A:
            delta = module.get_delta_weight(ADAPTER, short)
        module = module.base_layer
    weight = getattr(module, short, None)
    if not isinstance(weight, torch.Tensor):
        raise MechsafeError(f"block {layer}'s {kind} has no weight {short}")
    merged = any(getattr(m, "merged", False) for m in getattr(model.blocks[layer], kind).modules()
                 if isinstance(m, _lora_layer_cls()))
    return weight.detach().clone() if delta is None or merged else (weight + delta).detach()
