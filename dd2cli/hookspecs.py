"""Hook specifications: the whole plugin API of dd2.

A plugin is a module registered under the entry-point group ``dd2`` that implements some of
these hooks with ``@dd2cli.hookimpl``. Keep them few: one hook per kind of thing a plugin adds.
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("dd2")
hookimpl = pluggy.HookimplMarker("dd2")


@hookspec
def dd2_register_teachers(register: Callable) -> None:
    """Register teacher families.

    Called once per process, the first time dd2 needs the list of teachers (``dd2 teachers``,
    ``dd2 distill --teacher ...``, sampling from a teacher). Call ``register(family)`` for each
    ``dd2cli.teachers.Family`` the plugin offers; return nothing. Do not import torch or load
    weights here: a ``Variant``'s ``loader`` does that when the teacher is actually used.
    Registering a family name (or variant name) that another plugin already registered is an
    error that names both plugins.
    """
