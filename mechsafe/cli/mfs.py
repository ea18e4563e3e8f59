"""``mechsafe mfs``: massive feature superposition, as a detector bank or as neurons embedded in the weights.

::

    mechsafe mfs train --model smollm2-135m-aligned --out runs/bank --n-features 1000000
    mechsafe mfs eval --model smollm2-135m-aligned --bank runs/bank
    mechsafe mfs embed --out runs/mfs-model --n-features 10000
    mechsafe mfs embed-eval --model runs/mfs-model
    mechsafe mfs claims [--quick]

Every field of :class:`mechsafe.mfs.config.BankConfig` and :class:`mechsafe.mfs.config.TrainConfig` is a flag of
``train``; every field of :class:`mechsafe.mfs.embed.EmbedConfig` one of ``embed``.
"""

from __future__ import annotations

import argparse

from mechsafe.cli.common import add_config_flags, add_held_out_args, add_runs_arg, config_values, load_held_out


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

    from mechsafe.mfs.embed import EmbedConfig

    m = actions.add_parser("embed", help="add safety neurons to a model's MLPs, train them (the rest frozen) and save "
                                         "the wider model as a checkpoint")
    m.add_argument("--out", metavar="DIR", required=True, help="checkpoint folder to write (a killed run resumes "
                                                               "from DIR.work)")
    m.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    add_config_flags(m.add_argument_group("embedding (any EmbedConfig field)"), EmbedConfig)
    add_runs_arg(m)
    m.set_defaults(func=run_embed)

    v = actions.add_parser("embed-eval", help="refusal and over-refusal of an embedded model on held-out prompts as "
                                              "its added neurons are removed (random and targeted), and under "
                                              "refusal-direction ablation")
    v.add_argument("--model", metavar="DIR", required=True, help="a checkpoint from mechsafe mfs embed")
    v.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    v.add_argument("--harmful", default="harmful", help="harmful prompts: a bundled pool's TEST split or a local "
                                                        "file (default: %(default)s)")
    v.add_argument("--harmless", default="harmless", help="harmless prompts, the same way (default: %(default)s)")
    v.add_argument("--fractions", default="0,0.25,0.5,0.75,0.9", help="shares of added neurons removed (comma list)")
    v.add_argument("--max-new-tokens", type=int, default=24, help="greedy tokens judged per answer (default: "
                                                                  "%(default)s)")
    v.add_argument("--seed", type=int, default=0, help="seed of random removal")
    add_runs_arg(v)
    v.set_defaults(func=run_embed_eval)
    from mechsafe.mfs.claims import ClaimsConfig

    c = actions.add_parser("claims", help="the four MFS claims measured: attack cost against the aligned model, "
                                          "removal robustness, performance cost, SAE attack vs retraining; scaling "
                                          "with the number of features")
    c.add_argument("--quick", action="store_true", help="the quick profile: smaller models, sweeps and prompt sets")
    c.add_argument("--mfs", metavar="DIR", help="an embedded checkpoint (mechsafe mfs embed) to use as the MFS model "
                                                "of its size instead of building it")
    c.add_argument("--bank", metavar="DIR", help="a detector-mode bank of the base model (mechsafe mfs train) to "
                                                 "attack through its aggregator")
    add_held_out_args(c)
    c.add_argument("--budget", dest="budget_flops", type=float, default=argparse.SUPPRESS,
                   help="attacker's budget in FLOPs: a costlier break counts as none")
    add_config_flags(c.add_argument_group("study (any ClaimsConfig field)"), ClaimsConfig,
                     skip=("profile", "budget_flops"))
    c.add_argument("--work-dir", help="folder of every finished stage, for resuming (default: under "
                                      "$MECHSAFE_CACHE/mfs-claims)")
    add_runs_arg(c)
    c.set_defaults(func=run_claims)
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


def _fractions(text: str) -> list[float]:
    from mechsafe.errors import MechsafeError

    try:
        fractions = [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise MechsafeError(f"--fractions {text!r} is not a comma list of numbers, e.g. 0,0.5,0.9") from None
    if not fractions or any(not 0 <= f < 1 for f in fractions):
        raise MechsafeError("--fractions must be shares in [0, 1), e.g. 0,0.5,0.9")
    return fractions


def run_eval(args: argparse.Namespace) -> int:
    import numpy as np

    import mechsafe as ms
    from mechsafe.mfs.bank import load_bank
    from mechsafe.mfs.train import auroc, feature_importance, prompt_inputs, removal_curve, scores_of
    from mechsafe.runs import start_run

    fractions = _fractions(args.fractions)
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


def run_embed(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    import mechsafe as ms
    from mechsafe.mfs.embed import EmbedConfig, embed, save_embedded
    from mechsafe.runs import start_run

    config = EmbedConfig(**config_values(EmbedConfig, args))
    base = ms.load_model(config.base, processing="none", device=args.device)  # an unknown model fails here
    work = Path(args.out).with_name(Path(args.out).name + ".work")
    model, summary = embed(config, work, model=base, progress=not args.no_progress)
    out = save_embedded(model, args.out, base_model=config.base, embed_config=config.to_dict(),
                        training_mix=summary["training_mix"], final_loss=summary["losses"][-1],
                        timings_s=summary["timings_s"])
    shutil.rmtree(work, ignore_errors=True)
    with start_run(args.runs_dir, "mfs-embed", config=config.to_dict(), seed=config.seed, processing="none") as run:
        run.write_json("results.json", {**summary, "checkpoint": str(out)})
    n = summary["spec"]["counts"]
    print(f"added {sum(n)} neurons in {sum(c > 0 for c in n)} blocks (MLP width {summary['spec']['base_d_mlp']} -> "
          f"{summary['spec']['base_d_mlp'] + max(n)}); trained in {summary['timings_s']['train']:.0f} s")
    print(f"checkpoint: {out}")
    print(f"run directory: {run.path}")
    return 0


def run_embed_eval(args: argparse.Namespace) -> int:
    import mechsafe as ms
    from mechsafe.data import load_texts, prompt_pool
    from mechsafe.mfs.embed import (embedded_spec, neuron_importance, refusal_rates, refusal_write_direction,
                                    remove_neurons, removal_curve)
    from mechsafe.interventions import ablate_direction
    from mechsafe.runs import start_run

    fractions = _fractions(args.fractions)
    harmful, harmful_from = load_texts(args.harmful)
    harmless, harmless_from = load_texts(args.harmless)
    model = ms.load_model(args.model, processing="none", device=args.device)
    spec = embedded_spec(model)
    result = {"model": args.model, "n_features": spec.n_features, "directions": spec.directions,
              "data": {"harmful": harmful_from, "harmless": harmless_from}, "max_new_tokens": args.max_new_tokens}
    train_harmful = [p["text"] for p in prompt_pool("harmful", "train")]
    importance = neuron_importance(model, train_harmful)
    kw = dict(max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    result["removal"] = (removal_curve(model, harmful, harmless, fractions, "random", seed=args.seed, **kw)
                         + removal_curve(model, harmful, harmless, fractions, "targeted", importance=importance, **kw))
    edit = remove_neurons(model, range(spec.n_features))
    try:
        result["all_removed"] = refusal_rates(model, harmful, harmless, args.max_new_tokens)
    finally:
        edit.undo()
    layer = spec.layers[len(spec.layers) // 2]
    with ablate_direction(model, refusal_write_direction(model, layer)):
        result["direction_ablated"] = {"layer": layer, **refusal_rates(model, harmful, harmless, args.max_new_tokens)}
    with start_run(args.runs_dir, "mfs-embed-eval", config=vars(args) | {"func": None}, seed=args.seed,
                   processing="none") as run:
        run.figure("removal.png", _plot_embedded(result))
        run.write_json("results.json", result)
    full = result["removal"][0]
    print(f"refusal {full['refusal']['value']:.3f}, over-refusal {full['over_refusal']['value']:.3f} with every "
          f"neuron; {result['all_removed']['refusal']['value']:.3f} with none (the base model)")
    print(f"refusal with the refusal direction of block {layer} ablated: "
          f"{result['direction_ablated']['refusal']['value']:.3f}")
    print(f"run directory: {run.path}")
    return 0


def _plot_embedded(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, metric, title in zip(axes, ("refusal", "over_refusal"), ("harmful: refusal", "harmless: over-refusal")):
        for mode, style in (("random", "o-"), ("targeted", "s--")):
            points = [p for p in result["removal"] if p["mode"] == mode]
            xs = [p["fraction"] for p in points]
            ax.plot(xs, [p[metric]["value"] for p in points], style, label=f"{mode} removal")
            ax.fill_between(xs, [p[metric]["low"] for p in points], [p[metric]["high"] for p in points], alpha=0.15)
        ax.axhline(result["all_removed"][metric]["value"], color="gray", ls=":", label="all removed (base model)")
        ax.axhline(result["direction_ablated"][metric]["value"], color="red", ls="-.", lw=1,
                   label="refusal direction ablated")
        ax.set_title(f"{title} ({result['directions']}, {result['n_features']} neurons)")
        ax.set_xlabel("share of added neurons removed")
    axes[0].set_ylabel("rate (95% Wilson interval)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def run_claims(args: argparse.Namespace) -> int:
    from mechsafe.mfs.claims import ClaimsConfig, run_claims as study
    from mechsafe.mfs.claims_report import claims_markdown, plot_claims
    from mechsafe.runs import start_run

    config = ClaimsConfig(profile="quick" if args.quick else "full", **config_values(ClaimsConfig, args))
    sets = load_held_out(args)
    result = study(config, args.work_dir, sets["harmful"][0], sets["harmless"][0], mfs=args.mfs, bank=args.bank,
                   progress=not args.no_progress)
    result["data"]["sources"] = {kind: where for kind, (_, where) in sets.items()}
    with start_run(args.runs_dir, "mfs-claims", config=result["config"], seed=config.seed, processing="none") as run:
        run.figure("claims.png", plot_claims(result))
        run.write_json("results.json", result)
        run.write_text("report.md", claims_markdown(result, {"claims.png": "removal curves and scaling"}))
    for row in result["criteria"]:
        met = "-" if row["met"] is None else ("met" if row["met"] else "not met")
        print(f"{row['claim']:<52} {met:<8} {row['note']}")
    print(f"run directory: {run.path}")
    return 0
