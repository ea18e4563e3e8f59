"""Massive feature superposition: many sparse safety features attached through hooks, read by product keys, and
aggregated by an error-correcting code."""

from mechsafe.mfs.aggregate import RULES, aggregate, group_code, group_scores, tolerance
from mechsafe.mfs.keys import ProductKeys

__all__ = ["RULES", "ProductKeys", "aggregate", "group_code", "group_scores", "tolerance"]
