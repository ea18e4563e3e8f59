"""Massive feature superposition: many sparse safety features attached through hooks, read by product keys."""

from mechsafe.mfs.keys import ProductKeys

__all__ = ["ProductKeys"]
