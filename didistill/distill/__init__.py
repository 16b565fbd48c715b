"""Distillation methods. `get_method(config)` builds the `Method` named by `config.method`.

`config.method` is either a registered name, looked up in `METHODS`, or a path
"package.module:factory" to any importable factory (handy for experiments and tests). The
factory is called as `factory(config)` and returns a `didistill.train.method.Method`; it
raises `ValueError` for bad method-specific config values, which `main` reports as a usage
error. Method modules are imported only when their method is asked for; the one-step names
come from the one table of one-step methods (`one_step.table`).
"""

from __future__ import annotations

import importlib

from didistill.distill.one_step.table import METHODS as ONE_STEP_METHODS
from didistill.train.method import Method

# name -> "package.module:factory"
METHODS: dict[str, str] = {
    "toy_teacher": "didistill.distill.teachers.toy:make_method",
    "image_teacher": "didistill.distill.teachers.images:make_method",
    "mdlm_teacher": "didistill.distill.teachers.mdlm:make_method",
    "didi_instruct": "didistill.distill.discrete.didi:make_method",
    "step_halving": "didistill.distill.discrete.step_halving:make_method",
    "classifier": "didistill.distill.teachers.classifier:make_classifier_method",
    "kd": "didistill.distill.kd:make_kd_method",
    **{name: "didistill.distill.one_step.method:make_method" for name in ONE_STEP_METHODS},
}


def _resolve(name: str) -> str:
    if name in METHODS:
        return METHODS[name]
    module, sep, attr = name.partition(":")
    if sep and module and attr:
        return name
    registered = ", ".join(sorted(METHODS)) or "(none registered)"
    raise ValueError(
        f"config.method={name!r} is not a registered method nor a 'package.module:factory' "
        f"path. Registered methods: {registered}."
    )


def _import_factory(target: str):
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only a missing target module is a config error; a missing dependency is a real bug.
        if err.name is None or not (module_name + ".").startswith(err.name + "."):
            raise
        raise ValueError(f"config.method: cannot import module {module_name!r} ({err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"config.method: module {module_name!r} has no factory {attr!r}")
    return factory


def get_method(config) -> Method:
    """The `Method` for `config.method`; ValueError if the name is unknown."""
    target = _resolve(config.method)
    method = _import_factory(target)(config)
    if not isinstance(method, Method):
        raise TypeError(f"{target} returned {type(method).__name__}, not a Method")
    return method


__all__ = ["METHODS", "get_method"]
