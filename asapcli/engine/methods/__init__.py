"""Pruning methods behind one interface; `METHODS` is the registry the CLI offers.

Adding a method is one module here: a PruningMethod subclass with its `name`, traits and
`select`, which registers itself as its module is imported (base.PruningMethod.__init_subclass__);
this package imports each of its modules. A method module imports torch and the engine's ops
inside `select` only: the CLI reads the registry (names, options, defaults, traits) to build its
help and to count FLOPs, and starts in a blink without torch."""

from __future__ import annotations

import importlib
import pkgutil

from .asap import ANCHOR, REFILLED, Asap
from .base import (
    BY_SCORE,
    DIVERSE,
    GLOBAL_TOKEN,
    KEPT,
    KEPT_DIVERSE,
    REGISTERED,
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
from .hyperparameters import HYPERPARAMETERS, KV_CACHES, POSITIONS, SCORE_QUERIES, SCORES, Hyperparameter
from .pool import POOLED
from .prumerge_plus import SAMPLED
from .random import Random
from .sparsevlm import RECYCLED
from .vanilla import Vanilla
from .visionzip import CONTEXTUAL

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def _listed(method: type[PruningMethod]) -> tuple:
    """The registry's order: the unpruned reference, the methods that prune inside the language
    model, those that prune before it; by name within each."""
    return method.prunes, method.before_llm, method.name


METHODS: dict[str, type[PruningMethod]] = {cls.name: cls for cls in sorted(REGISTERED.values(), key=_listed)}
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
    "KV_CACHES",
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
