"""Entry points: SNIP scores of a model on named data (:func:`score`) and its groups (:func:`groups`)."""

from __future__ import annotations

import os
from pathlib import Path

from transformer_lens import HookedTransformer

from mechsafe import distributed
from mechsafe.snip.config import GroupConfig, ScoreConfig
from mechsafe.snip.data import scoring_pairs
from mechsafe.snip.groups import Group, make_groups
from mechsafe.snip.scores import ScoreStore, compute_scores, default_root


def score(model: HookedTransformer, config: ScoreConfig | None = None, root: str | os.PathLike | None = None,
          progress: bool = True) -> ScoreStore:
    """SNIP scores of ``model`` on the data ``config`` names (own responses generated and cached on first use),
    computed once and reused: ``score(model, ScoreConfig(data="utility"))``."""
    config = config or ScoreConfig()
    root = Path(root or default_root())
    if distributed.rank() == 0:  # rank 0 generates (and caches) own responses; the other ranks then read them
        pairs, description = scoring_pairs(model, config, root / "responses", progress=progress)
    distributed.barrier()
    if distributed.rank() != 0:
        pairs, description = scoring_pairs(model, config, root / "responses", progress=False)
    return compute_scores(model, pairs, config, root=root, progress=progress, description=description)


def groups(model: HookedTransformer, config: GroupConfig | None = None, safety: ScoreStore | None = None,
           utility: ScoreStore | None = None, root: str | os.PathLike | None = None,
           progress: bool = True) -> dict[str, Group]:
    """The groups of :func:`mechsafe.snip.groups.make_groups`, scoring ``safety-short`` and ``utility`` data with
    the default settings when no scores are given."""
    safety = safety or score(model, ScoreConfig(data="safety-short"), root, progress)
    utility = utility or score(model, ScoreConfig(data="utility"), root, progress)
    return make_groups(model, safety, utility, config)
