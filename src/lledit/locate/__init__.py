"""Locate-then-edit (MEMIT, AlphaEdit): the math both methods share.

An edit is written into the MLP output projections of a few consecutive
layers. Each projection maps a key (its input at the subject's last token,
`keys`) to a value that the residual stream carries on. For every edit a
target hidden state z at the last edited ("critical") layer is found by
gradient steps (`values`); the gap between z and the current hidden state is
divided over the edited layers and each layer's share is written into its
projection by the method's own closed form (`locator`), with the key
statistics of `lledit.stats` telling which directions ordinary inputs use.
"""

from lledit.locate.config import LocateConfig
from lledit.locate.keys import SubjectNotFoundError, subject_span, token_positions
from lledit.locate.locator import Locator, Solver

__all__ = [
    "LocateConfig",
    "Locator",
    "Solver",
    "SubjectNotFoundError",
    "subject_span",
    "token_positions",
]
