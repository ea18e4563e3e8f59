"""``mechsafe mfs``: a massive-feature-superposition safety bank in detector mode.

::

    mechsafe mfs train --model smollm2-135m-aligned --out runs/bank --n-features 1000000
    mechsafe mfs eval --model smollm2-135m-aligned --bank runs/bank

Every field of :class:`mechsafe.mfs.config.BankConfig` and :class:`mechsafe.mfs.config.TrainConfig` is a flag of
``train``.
"""

from __future__ import annotations

import argparse

from mechsafe.cli.common import add_config_flags, add_runs_arg, config_values


def register(sub: argparse._SubParsersAction) -> None:
    from mechsafe.mfs.config import BankConfig, TrainConfig

    p = sub.add_parser("mfs", help="massive feature superposition: a safety feature bank (detector mode)")
    actions = p.add_subparsers(dest="mfs_command", metavar="ACTION")
    t = actions.add_parser("train", help="build and train a safety bank on labelled prompts; saves it")
    t.add_argument("--model", default="smollm2-135m-aligned", help="model spec (default: %(default)s)")
    t.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    t.add_argument("--out", metavar="DIR", required=True, help="bank folder to write (a killed run resumes from "
                                                               "DIR.work)")
    add_config_flags(t.add_argument_group("bank (any BankConfig field)"), BankConfig)
    add_config_flags(t.add_argument_group("training (any TrainConfig field)"), TrainConfig, skip=("seed",))
    add_runs_arg(t)
    t.set_defaults(func=run_train)

    e = actions.add_parser("eval", help="held-out detection AUROC per aggregation rule against a dense probe, and "
                                        "removal curves")
    e.add_argument("--model", default="smollm2-135m-aligned", help="model spec (default: %(default)s)")
    e.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    e.add_argument("--bank", metavar="DIR", required=True, help="a bank folder from mechsafe mfs train")
    e.add_argument("--data", default="harmful_vs_harmless",
                   help="labelled prompts: a bundled suite or a local file with text and label columns; the probe "
                        "fits on its train split, both are measured on its test split (default: %(default)s)")
    e.add_argument("--fractions", default="0,0.1,0.25,0.5,0.75,0.9", help="shares of features removed (comma list)")
    e.add_argument("--seed", type=int, default=0, help="seed of random removal and of the intervals")
    add_runs_arg(e)
    e.set_defaults(func=run_eval)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _split(data: str):
    import mechsafe as ms

    ps = ms.data.load(data)
    train, test = ps.split("train"), ps.split("test")
    train.require_classes(2)
    test.require_classes(2)
    return train, test


def run_train(args: argparse.Namespace) -> int:
    import dataclasses
    import shutil
    from pathlib import Path

    import torch

    import mechsafe as ms
    from mechsafe.mfs.bank import save_bank
    from mechsafe.mfs.config import BankConfig, TrainConfig
    from mechsafe.mfs.train import auroc, build_bank, prompt_inputs, scores_of, train_bank
    from mechsafe.runs import start_run

    bank_config = BankConfig(**config_values(BankConfig, args))
    train_config = TrainConfig(**config_values(TrainConfig, args), seed=bank_config.seed)
    train, test = _split(train_config.data)
    model = ms.load_model(args.model, processing="none", device=args.device)
    bank = build_bank(model, bank_config)
    inputs = prompt_inputs(model, bank, train.texts)
    work = Path(args.out).with_name(Path(args.out).name + ".work")
    history = train_bank(bank, inputs, torch.tensor(train.labels), train_config, work_dir=work,
                         progress=not args.no_progress)
    held = prompt_inputs(model, bank, test.texts)
    result = {"auroc": {rule: auroc(scores_of(bank, held, rule), test.labels, bank_config.seed).to_dict()
                        for rule in ("median", "trimmed", "majority", "sum")},
              "n_features": bank.n_features, "sub_banks": [dataclasses.asdict(s.spec) for s in bank.subs],
              "final": {k: v[-1] for k, v in history.items()}}
    out = save_bank(bank, args.out, model, dataclasses.asdict(bank_config), train=dataclasses.asdict(train_config),
                    held_out_auroc=result["auroc"])
    shutil.rmtree(work, ignore_errors=True)
    with start_run(args.runs_dir, "mfs-train", config={"bank": dataclasses.asdict(bank_config),
                                                       "train": dataclasses.asdict(train_config)},
                   seed=bank_config.seed, processing="none") as run:
        run.write_json("results.json", {**result, "history": history, "bank": str(out)})
    for rule, est in result["auroc"].items():
        print(f"held-out AUROC ({rule}): {est['value']:.3f} [{est['low']:.3f}, {est['high']:.3f}]")
    print(f"bank: {out}")
    print(f"run directory: {run.path}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import numpy as np

    import mechsafe as ms
    from mechsafe.errors import MechsafeError
    from mechsafe.mfs.bank import load_bank
    from mechsafe.mfs.train import auroc, feature_importance, prompt_inputs, removal_curve, scores_of
    from mechsafe.runs import start_run

    try:
        fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    except ValueError:
        raise MechsafeError(f"--fractions {args.fractions!r} is not a comma list of numbers, e.g. 0,0.5,0.9") from None
    if not fractions or any(not 0 <= f < 1 for f in fractions):
        raise MechsafeError("--fractions must be shares in [0, 1), e.g. 0,0.5,0.9")
    model = ms.load_model(args.model, processing="none", device=args.device)
    bank, meta = load_bank(args.bank, model)
    train, test = _split(args.data)
    held, seen = prompt_inputs(model, bank, test.texts), prompt_inputs(model, bank, train.texts)
    labels = np.asarray(test.labels)
    result = {"bank": str(args.bank), "n_features": bank.n_features, "data": args.data,
              "auroc": {rule: auroc(scores_of(bank, held, rule), labels, args.seed).to_dict()
                        for rule in ("median", "trimmed", "majority", "sum")}}
    result["dense_probe"] = _dense_probe(model, bank, train, test, args.seed)
    importance = feature_importance(bank, seen)
    result["removal"] = (removal_curve(bank, held, labels, fractions, "random", seed=args.seed)
                         + removal_curve(bank, held, labels, fractions, "targeted", importance=importance,
                                         seed=args.seed))
    with start_run(args.runs_dir, "mfs-eval", config=vars(args) | {"func": None}, seed=args.seed,
                   processing="none") as run:
        run.figure("removal.png", _plot_removal(result))
        run.write_json("results.json", result)
    for rule, est in result["auroc"].items():
        print(f"held-out AUROC ({rule}): {est['value']:.3f} [{est['low']:.3f}, {est['high']:.3f}]")
    probe = result["dense_probe"]
    if probe:
        print(f"dense probe at {probe['hook']}: {probe['auroc']['value']:.3f}")
    print(f"run directory: {run.path}")
    return 0


def _dense_probe(model, bank, train, test, seed: int) -> dict | None:
    """The dense logistic probe (standardized, C by cross-validation) on the residual stream at the last prompt
    position of the bank's first semantic layer: the baseline the bank must beat."""
    import numpy as np

    from mechsafe.activations import cache_activations
    from mechsafe.hooks import hook_name
    from mechsafe.mfs.train import auroc
    from mechsafe.probes.methods import dense_estimator

    layers = [s.spec.layer for s in bank.subs if s.spec.type == "semantic"]
    if not layers:
        return None
    hook = hook_name(model, "resid_post", layers[0])
    fits = {}
    for name, ps in (("train", train), ("test", test)):
        store = cache_activations(model, ps, hook="resid_post", layers=[layers[0]], pooling=("last",), progress=False)
        fits[name] = store.pooled(hook, "last").numpy()
    probe = dense_estimator((0.01, 0.1, 1.0, 10.0), 5, 2000, 2)(seed).fit(fits["train"], train.labels)
    scores = probe.predict_proba(fits["test"])[:, 1]
    return {"hook": hook, "auroc": auroc(scores, np.asarray(test.labels), seed).to_dict()}


def _plot_removal(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, mode in zip(axes, ("random", "targeted")):
        points = [p for p in result["removal"] if p["mode"] == mode]
        for rule, style in (("median", "o-"), ("sum", "s--")):
            ax.plot([p["fraction"] for p in points], [p[rule]["value"] for p in points], style, label=rule)
            ax.fill_between([p["fraction"] for p in points], [p[rule]["low"] for p in points],
                            [p[rule]["high"] for p in points], alpha=0.15)
        if result.get("dense_probe"):
            ax.axhline(result["dense_probe"]["auroc"]["value"], color="gray", ls=":", label="dense probe")
        ax.set_title(f"{mode} removal")
        ax.set_xlabel("share of features removed")
    axes[0].set_ylabel("held-out detection AUROC")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
