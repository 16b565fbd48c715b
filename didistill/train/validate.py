"""Checks of the engine's config keys, before anything expensive happens.

`validate_config(config, num_devices, num_processes)` checks the keys the engine reads
(`seed`, `train.*`, `mesh.*`, see `configs/base.py`) and raises one `ConfigError` naming the
first bad key, its value and what values are allowed. Methods check their own keys in their
factories (raising `ValueError`, which `main` reports the same way).
"""

from __future__ import annotations

from didistill.train.errors import ConfigError


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_int(config, path: str, minimum: int, meaning: str = "") -> int:
    value = config
    for part in path.split("."):
        value = value[part]
    if not _is_int(value) or value < minimum:
        hint = f" ({meaning})" if meaning else ""
        raise ConfigError(
            f"config.{path}={value!r} is invalid: it must be an integer >= {minimum}{hint}. "
            f"Set it with --config.{path}=N."
        )
    return value


def check_batch_divisible(global_batch_size: int, num_devices: int, num_processes: int) -> None:
    """The global batch must split evenly over the devices of the data axis and the hosts."""
    for count, what in ((num_devices, "devices on the data axis"), (num_processes, "processes")):
        if global_batch_size % count:
            lower = global_batch_size // count * count
            choices = [c for c in (lower, lower + count) if c > 0]
            raise ConfigError(
                f"config.train.batch_size={global_batch_size} does not divide by the {count} "
                f"{what}: each must get the same number of rows. Valid choices are multiples "
                f"of {count}, e.g. --config.train.batch_size={' or '.join(map(str, choices))}."
            )


def data_axis_size(mesh_data: int, num_devices: int) -> int:
    """Size of the 'data' mesh axis for `config.mesh.data` (-1: every device)."""
    if mesh_data == -1:
        return num_devices
    if not _is_int(mesh_data) or mesh_data != num_devices:
        raise ConfigError(
            f"config.mesh.data={mesh_data!r} is invalid: the data axis must span all "
            f"{num_devices} devices. Valid choices: -1 (all devices) or {num_devices}."
        )
    return mesh_data


def validate_config(config, num_devices: int, num_processes: int = 1) -> None:
    """Raises `ConfigError` for the first invalid engine key of `config`."""
    _require_int(config, "seed", 0)
    _require_int(config, "train.num_steps", 0)
    batch_size = _require_int(config, "train.batch_size", 1, "the global batch over all devices")
    _require_int(config, "train.log_every", 1)
    _require_int(config, "train.checkpoint_every", 0, "0 saves only at the end and on preemption")
    _require_int(config, "train.keep_checkpoints", 1)
    _require_int(config, "train.max_nonfinite_steps", 1)
    if "keep_period" in config.train:
        _require_int(config, "train.keep_period", 0, "0 keeps only the newest checkpoints")
    if not isinstance(config.train.progress, bool):
        raise ConfigError(
            f"config.train.progress={config.train.progress!r} is invalid: valid choices are "
            "True or False."
        )
    data = data_axis_size(config.mesh.data, num_devices)
    check_batch_divisible(batch_size, data, num_processes)


# Method keys the methods read without checking them themselves (see the module docstring):
# the generator kinds of each data kind (`one_step/toy.py`: an MLP or the affine Gaussian of
# the exact-ratio oracle; `one_step/images.py`: the teacher's U-Net).
GENERATOR_KINDS = {"toy": ("mlp", "affine"), "images": ("unet",)}


def _data_kind(data) -> str | None:
    if data is None:
        return None
    if "toy" in data:
        return "toy"
    return data.get("kind")


def validate_method_keys(config) -> None:
    """Raises `ConfigError` for common method keys with values no method accepts."""
    generator, kind = config.get("generator"), _data_kind(config.get("data"))
    if generator is not None and "kind" in generator and kind in GENERATOR_KINDS:
        valid = GENERATOR_KINDS[kind]
        if generator.kind not in valid:
            raise ConfigError(
                f"config.generator.kind={generator.kind!r} is invalid for the {kind} data: valid "
                f"choices are {', '.join(map(repr, valid))}. Set it with "
                f"--config.generator.kind={valid[0]}."
            )
    evaluation = config.get("eval")
    if evaluation is not None:
        for key in ("num_samples", "batch_size"):
            if key in evaluation:
                _require_int(config, f"eval.{key}", 1)
        if "every" in evaluation:
            _require_int(config, "eval.every", 0, "0 turns the periodic evaluation off")


__all__ = [
    "GENERATOR_KINDS",
    "check_batch_divisible",
    "data_axis_size",
    "validate_config",
    "validate_method_keys",
]
