"""Pruning methods behind one interface; `METHODS` is the registry the CLI offers.

Adding a method is one module here (a PruningMethod with its traits and `select`) and one line
in METHODS. A method module imports torch and the engine's ops inside `select` only: the CLI
reads the registry (names, options, defaults, traits) to build its help and to count FLOPs, and
starts in a blink without torch."""

from __future__ import annotations

from .asap import ANCHOR, REFILLED, Asap, AsapBimaskOnly
from .base import (
    BY_SCORE,
    DIVERSE,
    GLOBAL_TOKEN,
    KEPT,
    KEPT_DIVERSE,
    SELECTED,
    UNPRUNED,
    PruningMethod,
    Role,
    Selection,
    SpanScores,
    SpanView,
)
from .divprune import DivPrune
from .fastv import FastV
from .hyperparameters import HYPERPARAMETERS, POSITIONS, SCORE_QUERIES, SCORES, Hyperparameter
from .pdrop import PyramidDrop
from .pool import POOLED, Pool
from .prumerge_plus import SAMPLED, PruMergePlus
from .random import Random
from .sparsevlm import RECYCLED, SparseVLM
from .vanilla import Vanilla
from .visionzip import CONTEXTUAL, VisionZip
from .vispruner import VisPruner

METHODS: dict[str, type[PruningMethod]] = {
    m.name: m
    for m in (
        Vanilla,
        FastV,
        Random,
        Asap,
        AsapBimaskOnly,
        DivPrune,
        Pool,
        VisPruner,
        VisionZip,
        PruMergePlus,
        PyramidDrop,
        SparseVLM,
    )
}
DEFAULT_METHOD = Asap.name  # what run, chat, flops and the API prune with unless told
REFERENCE = Vanilla.name  # the unpruned run every other is measured against (compare's first column)
DEFAULT_COMPARISON = (Vanilla.name, FastV.name, Asap.name)  # profile's --methods unless told
DEFAULT_EVALUATION = (Vanilla.name, FastV.name, Random.name, Asap.name)  # eval's
DEFAULT_SIDE_BY_SIDE = (FastV.name, Asap.name, DivPrune.name)  # compare's


def _roles() -> dict[str, Role]:
    """Every role a method's selections give, by name, then the role of a span left whole; in the
    order the legends list them. A role has one colour: the first declaration's; a role several
    methods give under words of their own has its general words (base.py's) here."""
    general = {role.name: role for role in (BY_SCORE, KEPT_DIVERSE, GLOBAL_TOKEN)}
    roles: dict[str, Role] = {}
    for method in METHODS.values():
        for role in method.roles:
            roles.setdefault(role.name, general.get(role.name, role))
    roles.setdefault(KEPT, UNPRUNED)
    return roles


ROLES = _roles()

__all__ = [
    "ANCHOR",
    "CONTEXTUAL",
    "DEFAULT_COMPARISON",
    "DEFAULT_EVALUATION",
    "DEFAULT_METHOD",
    "DEFAULT_SIDE_BY_SIDE",
    "DIVERSE",
    "HYPERPARAMETERS",
    "KEPT",
    "METHODS",
    "POOLED",
    "POSITIONS",
    "RECYCLED",
    "REFERENCE",
    "REFILLED",
    "ROLES",
    "SAMPLED",
    "SCORES",
    "SCORE_QUERIES",
    "SELECTED",
    "Hyperparameter",
    "PruningMethod",
    "Role",
    "Selection",
    "SpanScores",
    "SpanView",
]
