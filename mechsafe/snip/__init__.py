"""Safety-critical weights (Wei et al., ICML 2024): SNIP scores, neuron/head and weight groups, ActSVD low-rank
attribution and the pruning study.

    import mechsafe as ms
    from mechsafe import snip

    model = ms.load_model("smollm2-135m-aligned")                     # real weights (processing "none")
    safety = snip.score(model, snip.ScoreConfig(data="safety-short"))  # computed once, then reused
    utility = snip.score(model, snip.ScoreConfig(data="utility"))
    groups = snip.make_groups(model, safety, utility, snip.GroupConfig(safety_q=0.03, utility_p=0.03))
    with ms.interventions.prune_weights(model, groups["set-difference"].masks):
        ...                                                            # weights restored on exit
"""

from mechsafe.snip.actsvd import input_grams, output_directions
from mechsafe.snip.config import GroupConfig, ScoreConfig, StudyConfig
from mechsafe.snip.groups import GROUPS, Group, make_groups, random_like, set_difference, top_mask, unit_scores
from mechsafe.snip.run import groups, score
from mechsafe.snip.scores import ScoreStore, compute_scores, scores_of

__all__ = ["GROUPS", "Group", "GroupConfig", "ScoreConfig", "ScoreStore", "StudyConfig", "compute_scores", "groups",
           "input_grams", "make_groups", "output_directions", "random_like", "score", "scores_of", "set_difference",
           "top_mask", "unit_scores"]
