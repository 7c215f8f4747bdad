"""Compatibility alias: the conversions moved to :mod:`diffkit.noise` (the one noise-level adapter)."""

from ..noise import *  # noqa: F401,F403
from ..noise import __all__  # noqa: F401
