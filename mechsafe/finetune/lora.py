"""Attaching LoRA adapters to a ``HookedTransformer`` through PEFT, and merging them back.

TransformerLens keeps its weights as bare ``nn.Parameter`` s (``mlp.W_in`` is ``[d_model, d_mlp]``,
``attn.W_Q`` is ``[n_heads, d_model, d_head]``), not ``nn.Linear`` layers, and calls its attention
modules with keyword arguments only (``attn(query_input=..., key_input=..., ...)``). mechsafe
registers its own PEFT LoRA layer, :class:`TransformerLensLora`, for TransformerLens's attention and
MLP modules through PEFT's custom-module extension point (``LoraConfig._register_custom_module``)
and targets those modules with ``target_modules``. One layer adapts any of its module's weights at
once and passes every argument through unchanged, keywords included.

The update is computed as LoRA computes it on an ``nn.Linear``: the module runs with its own frozen
weights, and each adapted weight ``W`` (input ``x``) adds the low-rank branch
``scale * (x @ A.T) @ B.T`` to that weight's output, never forming ``W + scale * B @ A``:

* a weight whose output has a hook point of its own (``W_Q``/``_W_K``/``_W_V`` -> ``hook_q``/``k``/``v``;
  ``W_gate`` -> ``mlp.hook_pre``; ``W_in`` -> ``hook_pre_linear`` of a gated MLP, ``hook_pre`` of
  another) reads ``x`` from the module's arguments and adds the branch at that hook point, before any
  other hook there, so every hook sees the adapted value;
* ``W_O`` and ``W_out`` read ``x`` at ``hook_z`` / ``mlp.hook_post`` after every other hook there (what
  the weight itself receives) and add the branch to the module's output.

These hooks live only for the duration of the module's forward. The backward pass then computes the
input gradient through the frozen weight and the small factor gradients, instead of a full
weight-sized gradient of ``W + scale * B @ A`` and a fresh copy of every adapted weight per forward pass
(parameter LoRA, PEFT's ``target_parameters``): 1.36x faster per training pass on the align recipe's MLP
weights (``benchmarks/bench_lora_branch.py``). Values equal a merged model's up to float rounding.

All layers live in one PEFT ``LoraModel``: PEFT marks only the LoRA factors trainable, and
``LoraModel.merge_and_unload()`` folds every adapter into its weight and puts the original
TransformerLens modules back, so a merged model is a plain ``HookedTransformer``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import nn
from transformer_lens import HookedTransformer
from transformer_lens.components.abstract_attention import AbstractAttention
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.components.mlps.mlp import MLP

from mechsafe.errors import MechsafeError
from mechsafe.finetune.config import FinetuneConfig
from mechsafe.models import linear_layout
from mechsafe.weights import select, weight

ADAPTER = "default"
"""Name of the one adapter mechsafe trains."""

_QKV = {"W_Q": ("query_input", "hook_q"), "_W_K": ("key_input", "hook_k"), "_W_V": ("value_input", "hook_v"),
        "W_K": ("key_input", "hook_k"), "W_V": ("value_input", "hook_v")}
"""Attention weights ``[heads, d_model, d_head]``: the keyword argument they read and the hook point of their output."""
_ATTN_ARGS = ("query_input", "key_input", "value_input")
"""TransformerLens attention's first positional parameters, in order."""
_MLP_WEIGHTS = ("W_in", "W_gate", "W_out")


def _lora_layer_cls():
    from peft.tuners.lora.layer import LoraLayer

    return LoraLayer


def _weight_dims(name: str, shape: torch.Size) -> tuple[int, int]:
    """(in_features, out_features) of a TransformerLens weight seen as one linear map."""
    if name in _MLP_WEIGHTS and len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3 and name in _QKV:
        heads, d_model, d_head = shape
        return d_model, heads * d_head
    if len(shape) == 3 and name == "W_O":
        heads, d_head, d_model = shape
        return heads * d_head, d_model
    raise MechsafeError(f"weight {name!r} of shape {tuple(shape)} cannot take LoRA; "
                        "adapt mlp.W_in, W_gate, W_out or attn.W_Q, W_K, W_V, W_O")


def _check_supported(module: nn.Module, weights: tuple[str, ...]) -> None:
    """One-line errors for TransformerLens modules and settings the low-rank branch does not cover."""
    cfg = module.cfg
    if getattr(cfg, "load_in_4bit", False):
        raise MechsafeError("LoRA on a 4-bit model is not supported; load the model in float32 or bfloat16")
    if isinstance(module, AbstractAttention):
        if cfg.use_split_qkv_input or cfg.use_attn_in:
            raise MechsafeError("LoRA on attention needs use_split_qkv_input=False and use_attn_in=False; "
                                "switch them off while the adapters are attached")
        if "W_O" in weights and cfg.use_attn_result:
            raise MechsafeError("LoRA on attn.W_O needs use_attn_result=False (hook_result would miss the update); "
                                "switch it off while the adapters are attached or merge them first")
    elif not isinstance(module, (MLP, GatedMLP)):
        raise MechsafeError(f"LoRA on MLP weights supports TransformerLens MLP and GatedMLP, not {type(module).__name__}; "
                            "drop the mlp.* targets for this model")


def _make_lora_cls():
    """Build :class:`TransformerLensLora` (PEFT is imported lazily: no import cost for ``import mechsafe``)."""
    from peft.tuners.tuners_utils import check_adapters_to_merge

    LoraLayer = _lora_layer_cls()

    class TransformerLensLora(nn.Module, LoraLayer):
        """LoRA on the weights of one TransformerLens attention or MLP module (see the module docstring).

        Each adapted weight gets factors ``A`` [r, in] and ``B`` [out, r] (``B`` starts at zero, so the
        adapter starts as the identity). Its update ``scale * B @ A``, reshaped to the weight's
        TransformerLens shape, is what merging adds: ``W_Q``/``_W_K``/``_W_V`` map ``d_model -> heads * d_head``,
        ``W_O`` maps ``heads * d_head -> d_model``, ``W_in``/``W_gate`` map ``d_model -> d_mlp`` and
        ``W_out`` maps ``d_mlp -> d_model``.
        """

        adapter_layer_names = ("lora_A", "lora_B")

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: float = 1,
                     weights: tuple[str, ...] = (), **kwargs: Any) -> None:
            super().__init__()
            kwargs.pop("parameter_name", None)
            LoraLayer.__init__(self, base_layer, **kwargs)
            self.weights = tuple(weights)
            _check_supported(self.get_base_layer(), self.weights)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module: nn.Module) -> tuple[None, None]:
            return None, None  # several weights of different shapes: no single in/out size

        def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs: Any) -> None:
            if r <= 0:
                raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
            base = self.get_base_layer()
            self.r[adapter_name] = r
            self.lora_alpha[adapter_name] = lora_alpha
            self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
            self.use_rslora[adapter_name] = config.use_rslora
            self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
            a_dict, b_dict = nn.ParameterDict(), nn.ParameterDict()
            for name in self.weights:
                weight = getattr(base, name)
                n_in, n_out = _weight_dims(name, weight.shape)
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
            delta = (self.lora_B[adapter_name][name] @ self.lora_A[adapter_name][name]) * self.scaling[adapter_name]
            if weight.dim() == 2:  # delta: [out, in] -> [in, out]
                return delta.T.to(weight.dtype)
            heads, a, b = weight.shape
            if name in _QKV:  # delta: [heads*d_head, d_model] -> [heads, d_model, d_head]
                return delta.reshape(heads, b, a).transpose(1, 2).to(weight.dtype)
            return delta.T.reshape(heads, a, b).to(weight.dtype)  # [d_model, heads*d_head] -> [heads, d_head, d_model]

        def _branch(self, name: str, x: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
            """``into + sum over active adapters of (scale * dropout(x) @ A.T) @ B.T`` for weight ``name``: input
            ``x [..., in]``, ``into [..., out]`` (``None``: zeros). The scale is applied to the rank-``r`` product and
            each adapter's ``B`` product is accumulated into ``into`` by one fused ``addmm``."""
            out = into.reshape(-1, into.shape[-1]) if into is not None else None
            for adapter in self.active_adapters:
                if adapter not in self.lora_A:
                    continue
                a, b = self.lora_A[adapter][name], self.lora_B[adapter][name]
                h = (self.lora_dropout[adapter](x.to(a.dtype)) @ a.T).reshape(-1, a.shape[0]) * self.scaling[adapter]
                out = h @ b.T if out is None else torch.addmm(out.to(h.dtype), h, b.T)
            return out.reshape(*x.shape[:-1], -1)

        def _routes(self, args: tuple, kwargs: dict) -> tuple[list[tuple[str, torch.Tensor, str]], list[tuple[str, str]]]:
            """Weights whose input is an argument (``(name, x, output hook)``) and weights whose input is read at a
            hook point and whose branch joins the module's output (``(name, input hook)``)."""
            base = self.get_base_layer()
            _check_supported(base, self.weights)
            at_hook, to_output = [], []
            if isinstance(base, AbstractAttention):
                inputs = dict(zip(_ATTN_ARGS, args)) | kwargs
                for name in self.weights:
                    if name == "W_O":
                        to_output.append((name, "hook_z"))
                    else:
                        arg, hook = _QKV[name]
                        at_hook.append((name, inputs[arg], hook))
            else:
                x = args[0] if args else kwargs["x"]
                gated = isinstance(base, GatedMLP)
                for name in self.weights:
                    if name == "W_out":
                        to_output.append((name, "hook_post"))
                    else:
                        at_hook.append((name, x, "hook_pre" if name == "W_gate" or not gated else "hook_pre_linear"))
            return at_hook, to_output

        def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            base = self.get_base_layer()
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return self.base_layer(*args, **kwargs)
            if self.merged or not any(a in self.lora_A for a in self.active_adapters):
                return self.base_layer(*args, **kwargs)
            at_hook, to_output = self._routes(args, kwargs)
            seen: dict[str, torch.Tensor] = {}
            handles = []
            try:
                for name, x, hook in at_hook:  # first at its hook point: every other hook sees the adapted value
                    handles.append(getattr(base, hook).register_forward_hook(self._adder(name, x), prepend=True))
                for name, hook in to_output:  # last at its hook point: the input the weight itself receives
                    handles.append(getattr(base, hook).register_forward_hook(_recorder(seen, name)))
                out = self.base_layer(*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            for name, _ in to_output:
                x = seen[name]
                out = self._branch(name, x.flatten(-2) if name == "W_O" else x, into=out).to(out.dtype)
            return out

        def _adder(self, name: str, x: torch.Tensor) -> Callable:
            def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
                if output.dim() == x.dim():  # MLP: [..., d_mlp]
                    return self._branch(name, x, into=output).to(output.dtype)
                heads, weight_heads = output.shape[-2], getattr(self.get_base_layer(), name).shape[0]
                if heads == weight_heads:  # attention: [..., heads * d_head] <-> [..., heads, d_head]
                    return self._branch(name, x, into=output.flatten(-2)).reshape(output.shape).to(output.dtype)
                y = self._branch(name, x).unflatten(-1, (weight_heads, -1))  # grouped K/V feeding ungrouped heads
                return output + y.repeat_interleave(heads // weight_heads, dim=-2).to(output.dtype)
            return hook

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
            return f"mechsafe.TransformerLensLora(weights={list(self.weights)}, base_layer={self.base_layer!r})"

    return TransformerLensLora


def _recorder(store: dict[str, torch.Tensor], name: str) -> Callable:
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        store[name] = output
    return hook


@functools.lru_cache(maxsize=1)
def lora_layer_cls() -> type:
    """The :class:`TransformerLensLora` class (a PEFT ``LoraLayer``), built on first use."""
    return _make_lora_cls()


def peft_config(model: HookedTransformer, config: FinetuneConfig):
    """The PEFT ``LoraConfig`` for ``config`` on ``model``: the attention and MLP modules of the selected layers
    (:func:`mechsafe.weights.select`), each adapted by one :class:`TransformerLensLora`."""
    from peft import LoraConfig

    handles = select(model, config.targets, config.layers)  # a kind the model lacks fails here, naming the fix
    by_part: dict[str, list[str]] = {}
    modules: list[str] = []
    for h in handles:
        part = h.kind.split(".")[0]
        if h.attr not in by_part.setdefault(part, []):
            by_part[part].append(h.attr)
        module = h.name.rsplit(".", 1)[0]
        if module not in modules:
            modules.append(module)
    cls = lora_layer_cls()
    custom = {}
    first = handles[0].layer
    if "attn" in by_part:
        custom[AbstractAttention] = functools.partial(cls, weights=tuple(by_part["attn"]))
        _check_supported(model.blocks[first].attn, tuple(by_part["attn"]))  # before PEFT wraps any module
    if "mlp" in by_part:
        custom[MLP] = custom[GatedMLP] = functools.partial(cls, weights=tuple(by_part["mlp"]))
        _check_supported(model.blocks[first].mlp, tuple(by_part["mlp"]))
    lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, bias="none",
                             target_modules=modules)
    lora_config._register_custom_module(custom)
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
    model.train(model.training)  # new modules (dropout) start in training mode: give them the model's mode
    tuner.mechsafe_parameter_order = order  # restored by merge_lora/remove_lora
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
    """The weight ``target`` (a :data:`mechsafe.weights.WEIGHT_KINDS` kind, e.g. ``"mlp.W_in"``) of block ``layer``
    with its LoRA update included.

    Works on a plain model (returns the weight) and on one carrying adapters (base weight plus
    ``scale * B @ A`` in TransformerLens shape), e.g. inside a :func:`~mechsafe.finetune.finetune`
    callback that snapshots neuron weights.
    """
    handle = weight(model, target, layer)
    module = getattr(model.blocks[handle.layer], target.split(".")[0])
    delta = None
    if isinstance(module, _lora_layer_cls()) and handle.attr in module.weights and ADAPTER in module.lora_A \
            and not module.merged:
        delta = module.get_delta_weight(ADAPTER, handle.attr)
    return handle.parameter.detach().clone() if delta is None else (handle.parameter + delta).detach()
