"""The registry of editing methods, and building an editor from a name and settings."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

from lledit.edit import EditMethod
from lledit.methods.alphaedit import AlphaEdit, AlphaEditConfig
from lledit.methods.elder import ElderConfig, ElderEditor
from lledit.methods.ft import FineTune, FTConfig
from lledit.methods.grace import GRACE, GRACEConfig
from lledit.methods.locft import LocFT, LocFTConfig
from lledit.methods.malmen import MALMEN
from lledit.methods.memit import MEMIT, MEMITConfig
from lledit.methods.memoir import MEMOIR, MemoirConfig
from lledit.methods.mend import MEND
from lledit.methods.none import NoEdit
from lledit.methods.rledit import RLEdit
from lledit.methods.ultraedit import UltraEdit, UltraEditConfig
from lledit.model import EditorShare, ModelHandle

METHODS: dict[str, type] = {
    method.name: method
    for method in (
        NoEdit,
        FineTune,
        LocFT,
        MEND,
        MALMEN,
        RLEdit,
        MEMIT,
        AlphaEdit,
        ElderEditor,
        GRACE,
        MEMOIR,
        UltraEdit,
    )
}


class UnknownMethodError(ValueError):
    pass


def method_class(name: str) -> type:
    if name not in METHODS:
        raise UnknownMethodError(f"unknown method '{name}'; available: {', '.join(METHODS)}")
    return METHODS[name]


def config_fields(name: str, config_class: type | None = None) -> list[tuple[str, Any, Any]]:
    """(field name, type, default) of a method's config dataclass (or of `config_class`)."""
    config_class = config_class or method_class(name).config_class
    hints = typing.get_type_hints(config_class)
    return [(f.name, hints[f.name], f.default) for f in dataclasses.fields(config_class)]


def _parse_value(text: str, kind: Any, key: str) -> Any:
    """Turn `text` into a value of the (possibly optional) field type `kind`."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if type(None) in options and text.lower() in ("none", "null"):
        return None
    for option in options:
        if option is type(None):
            continue
        if option is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            continue
        try:
            return option(text)
        except (TypeError, ValueError):
            continue
    raise ValueError(f"setting '{key}': cannot read {text!r} as {kind}")


def _check_setting(name: str, key: str, known: list[str]) -> None:
    if key not in known:
        raise ValueError(
            f"method '{name}' has no setting '{key}'; its settings: {', '.join(known) or '-'}"
        )


def parse_settings(
    name: str, settings: list[str], config_class: type | None = None
) -> dict[str, Any]:
    """Read `key=value` strings against a method's config fields (or `config_class`'s)."""
    fields = {field_name: kind for field_name, kind, _ in config_fields(name, config_class)}
    parsed = {}
    for setting in settings:
        key, separator, text = setting.partition("=")
        key = key.strip().replace("-", "_")
        if not separator:
            raise ValueError(f"setting {setting!r} is not of the form key=value")
        _check_setting(name, key, list(fields))
        parsed[key] = _parse_value(text.strip(), fields[key], key)
    return parsed


def is_trained(name: str) -> bool:
    """Whether a method edits with a network trained beforehand (`lledit train`),
    which its `checkpoint` setting names."""
    return hasattr(method_class(name), "train_config_class")


def train_config_class(name: str) -> type:
    """The training config dataclass of a method that is trained before it edits."""
    if not is_trained(name):
        trained = [n for n in METHODS if is_trained(n)]
        raise UnknownMethodError(
            f"method '{name}' is not trained; methods that are: {', '.join(trained)}"
        )
    return method_class(name).train_config_class


def make_editor(name: str, handle: ModelHandle, **settings: Any) -> EditMethod:
    """An editor for `handle`; `settings` override fields of the method's config.

    A path (a checkpoint, a corpus) is kept as text, so the editor's settings
    serialise into results and journals as they are.
    """
    method = method_class(name)
    known = [field_name for field_name, _, _ in config_fields(name)]
    for key in settings:
        _check_setting(name, key, known)
    settings = {
        key: os.fspath(value) if isinstance(value, os.PathLike) else value
        for key, value in settings.items()
    }
    return method(handle, method.config_class(**settings))


def editor_share(name: str, **settings: Any) -> EditorShare:
    """What `load_model` adds to the weights for editor `name` with `settings`:
    the editor is built on the model's meta-device skeleton and counts itself."""

    def share(skeleton: ModelHandle) -> tuple[str, int]:
        return name, make_editor(name, skeleton, **settings).memory_share()

    return share


__all__ = [
    "GRACE",
    "MALMEN",
    "MEMIT",
    "MEMOIR",
    "MEND",
    "METHODS",
    "AlphaEdit",
    "AlphaEditConfig",
    "ElderConfig",
    "ElderEditor",
    "FTConfig",
    "FineTune",
    "GRACEConfig",
    "LocFT",
    "LocFTConfig",
    "MEMITConfig",
    "MemoirConfig",
    "NoEdit",
    "RLEdit",
    "UltraEdit",
    "UltraEditConfig",
    "UnknownMethodError",
    "config_fields",
    "editor_share",
    "is_trained",
    "make_editor",
    "method_class",
    "parse_settings",
    "train_config_class",
]
