"""How each new token is picked: greedily (temperature 0), or sampled at a temperature, from the
`top_k` likeliest tokens and the smallest set of them whose probability reaches `top_p` where
given. Light (no torch): the CLI checks the values as it parses them."""

from __future__ import annotations

import math

from ..errors import UsageError


def check(temperature: float, top_p: float | None = None, top_k: int | None = None) -> None:
    """The values generate() can sample by, in the option's words (the API's keywords are the
    same with underscores)."""
    if not isinstance(temperature, int | float) or isinstance(temperature, bool):
        raise UsageError(f"temperature must be a number, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UsageError(f"temperature must be a finite number of at least 0 (0 is greedy), got {temperature!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1):
        raise UsageError(f"top-p must be a number above 0 and at most 1, got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UsageError(f"top-k must be a whole number of at least 1, got {top_k!r}")
    if temperature == 0 and (top_p is not None or top_k is not None):
        raise UsageError("top-p and top-k choose among sampled tokens: give a temperature above 0 (0 is greedy)")


def generate_options(temperature: float, top_p: float | None = None, top_k: int | None = None) -> dict:
    """generate()'s keywords for it; no cut that was not asked for (the model's generation config
    may carry its own top-k or top-p, which would apply silently)."""
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
