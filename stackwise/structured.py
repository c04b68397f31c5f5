"""Structured configs: config dataclasses that OmegaConf type-checks and `__post_init__` range-checks.

The config dataclasses (`RunConfig` and its nodes in stackwise/config/, `ModelConfig`,
`MaskingConfig`, `DataConfig`) are Hydra's schema: OmegaConf rejects an unknown key or a value of
the wrong type while the config is composed, and each class's `__post_init__` checks what only
code can (ranges, divisibility, one field against another), as litgpt's `Config` does.

A dataclass does not know where it sits in the tree, so each class names its errors by its usual
place (`PATH`: `ModelConfig` says `model.d_model`), and `build` moves a name to where the node
really is (an `OptimConfig` under `stages.layer.optim` says `stages.layer.optim.lr`). `build`
converts the children of a node before the node itself, so a child's check runs, and is named,
before the parent's cross-field checks that rely on it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stackwise.errors import ConfigError

T = TypeVar("T", bound="Structured")


class Structured:
    """Base of the config dataclasses: `key(name)` for error names, `from_dict` for plain mappings."""

    PATH: ClassVar[str] = ""  # where the node usually sits in the root config ("" = the root)

    def key(self, name: str) -> str:
        """The dotted name of field `name`, for a ConfigError."""
        return f"{self.PATH}.{name}" if self.PATH else name

    @classmethod
    def from_dict(cls: type[T], d: Mapping[str, Any], prefix: str | None = None) -> T:
        """Build from a plain mapping (a JSON file, a dict in code), checked as the composed config is.

        Unlike OmegaConf, a string is not taken for a number or a flag here: a mapping that did not
        come from the command line has real types, and "0.1" in it is a mistake. Errors are named
        under `prefix` (default: the class's usual place).
        """
        prefix = cls.PATH if prefix is None else prefix
        _reject_strings_for_scalars(cls, d, prefix)
        try:
            node = OmegaConf.merge(OmegaConf.structured(cls), dict(d))
        except OmegaConfBaseException as e:
            raise as_config_error(e, prefix) from None
        return build(cls, node, prefix)


def build(cls: type[T], node: DictConfig, prefix: str, **given: Any) -> T:
    """Instantiate `cls` from a typed node: nested config dataclasses first, then `cls` itself.

    `given` supplies fields already built by the caller. A ConfigError is renamed from the
    class's usual place to `prefix`; an OmegaConf error (a `???` left unset, a broken
    interpolation) becomes a ConfigError naming its key.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in node:
        if key not in names:  # Hydra's `+key=value` opens even a schema node to new keys
            raise ConfigError(_join(prefix, str(key)), f"unknown key; allowed: {', '.join(names)}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            kwargs[f.name] = given[f.name]
            continue
        typ = hints[f.name]
        try:
            value = node[f.name]
            if isinstance(typ, type) and issubclass(typ, Structured):
                value = build(typ, value, _join(prefix, f.name))
            elif OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as e:
            # OmegaConf names the key from the root of its tree; `node` may sit anywhere in it
            raise as_config_error(e, prefix, within=node._get_full_key(None)) from None
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise relocate(e, cls.PATH, prefix) from None


def relocate(e: ConfigError, usual: str, actual: str) -> ConfigError:
    """`e` named under `actual` instead of `usual` (unchanged when it names something else)."""
    if usual == actual:
        return e
    name = e.field
    if not usual:
        name = _join(actual, name)
    elif name == usual or name.startswith(usual + "."):
        name = actual + name[len(usual) :]
    else:
        return e
    return ConfigError(name, message_of(e))


def message_of(e: ConfigError) -> str:
    """The message of a ConfigError without its `field: ` head."""
    return str(e)[len(e.field) + 2 :]


def as_config_error(e: OmegaConfBaseException, prefix: str, within: str = "") -> ConfigError:
    """An OmegaConf error as our one-line ConfigError naming the full key: its key relative to the
    node `within` (a full key of the tree OmegaConf reported in), put under `prefix`."""
    key = str(getattr(e, "full_key", "") or "")
    if within and (key == within or key.startswith(within + ".") or key.startswith(within + "[")):
        key = key[len(within) :].lstrip(".")
    msg = getattr(e, "msg", None) or str(e)
    message = " ".join(msg.strip().splitlines()[0].split()) if msg.strip() else type(e).__name__
    return ConfigError(_join(prefix, key) or prefix or "config", message)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool, not a string: `optim.lr=abc` must not reach a comparison)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check(ok: bool, name: str, message: str) -> None:
    """Raise ConfigError(name, message) unless `ok`."""
    if not ok:
        raise ConfigError(name, message)


def _join(prefix: str, name: str) -> str:
    if not prefix:
        return name
    if not name:
        return prefix
    return f"{prefix}{name}" if name.startswith("[") else f"{prefix}.{name}"


def _reject_strings_for_scalars(cls: type, d: Mapping[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in d.items():
        if key not in names:
            continue  # OmegaConf names it as an unknown key
        typ = hints[key]
        args = set(typing.get_args(typ)) - {type(None)}
        base = next(iter(args)) if len(args) == 1 else typ
        if isinstance(value, str) and base in (int, float, bool):
            kind = {int: "an integer", float: "a number", bool: "true or false"}[base]
            raise ConfigError(_join(prefix, key), f"must be {kind}, got {value!r}")
        if isinstance(base, type) and issubclass(base, Structured) and isinstance(value, Mapping):
            _reject_strings_for_scalars(base, value, _join(prefix, key))
