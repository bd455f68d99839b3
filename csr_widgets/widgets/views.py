"""Every widget showing one model hears when another changes it.

Two explorers on one model used to drift apart: pruning a prototype in one atlas explorer
left another showing it kept, and an explorer's prediction stale after a refit. The state
lives in the model (``prototype_mask``, ``concept_mask``, the task head); a widget that
changes it calls ``announce(model)``, and every other widget that ``follow``-s the model
shows it again. Widgets are held weakly: a closed explorer is forgotten.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

_followers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [WeakMethod]


def follow(model, callback: Callable[[], None]) -> None:
    """Call ``callback()`` (a bound method of a widget) whenever ``model`` is announced changed."""
    _followers.setdefault(model, []).append(weakref.WeakMethod(callback))


def announce(model, source=None) -> None:
    """``model``'s masks or head changed: tell every follower except ``source`` (the widget that changed it)."""
    alive = []
    for method in _followers.get(model, []):
        callback = method()
        if callback is None:
            continue
        alive.append(method)
        if getattr(callback, "__self__", None) is not source:
            callback()
    if model in _followers:
        _followers[model] = alive
