"""``mechsafe cache``: cache pooled activations of a dataset (and reuse them later)."""

from __future__ import annotations

import argparse

from mechsafe.cli.common import add_data_args, add_model_args, data_kwargs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="cache pooled activations of a dataset to disk")
    add_model_args(p)
    add_data_args(p)
    p.set_defaults(data="harmful_vs_harmless")
    p.add_argument("--hook", default="resid_post", help="hook kind (default: %(default)s)")
    p.add_argument("--layers", default="all", help="layer selector: all, early, middle, late, last, 3-7, 0,5,9")
    p.add_argument("--pooling", default="last,mean", help="comma list of last, mean, tokens")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--activation-root", "--root", dest="root", help="store folder (default: $MECHSAFE_CACHE/activations)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import mechsafe as ms

    prompts = ms.data.load(args.data, **data_kwargs(args))
    cfg = ms.ActivationConfig(hook=args.hook, layers=args.layers, pooling=tuple(args.pooling.split(",")),
                              batch_size=args.batch_size)
    model = ms.load_model(args.model, processing=args.processing, device=args.device)
    store = ms.cache_activations(model, prompts, cfg, root=args.root, progress=not args.no_progress)
    print(f"{store.n_prompts} prompts x {len(store.hooks)} hooks -> {store.path}")
    return 0
