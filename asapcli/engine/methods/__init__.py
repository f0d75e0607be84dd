"""Pruning methods behind one interface; `METHODS` is the registry the CLI offers.

A method module imports torch and the engine's ops inside `select` only: the CLI reads the
registry (names, options, defaults, flags) to build its help and to count FLOPs, and starts in a
blink without torch."""

from __future__ import annotations

from .asap import Asap, AsapBimaskOnly
from .base import ANCHOR, KEPT, POOLED, REFILLED, ROLES, SELECTED, PruningMethod, Selection, SpanScores, SpanView
from .divprune import DivPrune
from .fastv import FastV
from .hyperparameters import HYPERPARAMETERS, POSITIONS, SCORE_QUERIES, SCORES, Hyperparameter
from .pool import Pool
from .random import Random
from .vanilla import Vanilla

METHODS: dict[str, type[PruningMethod]] = {
    m.name: m for m in (Vanilla, FastV, Random, Asap, AsapBimaskOnly, DivPrune, Pool)
}

__all__ = [
    "ANCHOR",
    "HYPERPARAMETERS",
    "KEPT",
    "METHODS",
    "POOLED",
    "POSITIONS",
    "REFILLED",
    "ROLES",
    "SCORES",
    "SCORE_QUERIES",
    "SELECTED",
    "Hyperparameter",
    "PruningMethod",
    "Selection",
    "SpanScores",
    "SpanView",
]
