"""One config system: stdlib dataclasses, loaded from YAML and overridden by command-line flags.

Each field has a type, a default and ``metadata={"help": ...}``; ``metadata["flag"]`` renames its
flag (``base_models`` -> ``--base-model``, given once per value). A command's YAML file takes either
spelling at its top level (``output_dir`` or ``output``, ``base_models`` or ``base_model``), and
``--help`` names the YAML key beside a flag spelt differently. An unknown YAML key is an error
naming its path with a did-you-mean. Secrets never live in configs: they come from the environment.
"""

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from magpie_teach.artefacts import parse_yaml_mapping, read_yaml_mapping  # noqa: F401 - the one YAML reader
from magpie_teach.errors import ConfigError

C = TypeVar("C")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type, whether it is a list) of an annotation such as ``list[str] | None``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def flag_key(f: dataclasses.Field) -> str:
    """The flag's spelling as a YAML key: ``--base-model`` -> ``base_model``."""
    return flag_name(f).lstrip("-").replace("-", "_")


def _accept_flag_spellings(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """VALUES with top-level keys spelt like their flags (``output``, ``base-model``) renamed to the field names."""
    aliases = {}
    for f in dataclasses.fields(cls):
        for alias in (flag_key(f), flag_key(f).replace("_", "-"), f.name.replace("_", "-")):
            if alias != f.name:
                aliases[alias] = f.name
    renamed: dict[str, Any] = {}
    spelt: dict[str, str] = {}
    for key, value in values.items():
        name = aliases.get(key, key)
        if name in renamed:
            raise ConfigError(f"{where}: {spelt[name]!r} and {key!r} both set {name!r}; keep one")
        renamed[name], spelt[name] = value, key
    return renamed


def _owner(cls: type, name: str) -> type:
    """The class in CLS's hierarchy that declares field NAME (CLS itself, or a shared settings base)."""
    return next(k for k in cls.__mro__ if name in vars(k).get("__annotations__", {}))


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one flag per field of ``cls``: its own first, then each shared settings base's in a group titled by the
    base's docstring. Defaults are left out (``None``) so that YAML values can show through."""
    hints = typing.get_type_hints(cls)
    owners = {f.name: _owner(cls, f.name) for f in dataclasses.fields(cls)}
    ordered = sorted(dataclasses.fields(cls), key=lambda f: owners[f.name] is not cls)  # stable: own fields first
    groups: dict[type, Any] = {}
    for f in ordered:
        owner = owners[f.name]
        target = parser
        if owner is not cls:
            if owner not in groups:
                groups[owner] = parser.add_argument_group(
                    (owner.__doc__ or owner.__name__).strip().splitlines()[0].rstrip(".")
                )
            target = groups[owner]
        kind, is_list = _base_type(hints[f.name])
        default = None if f.default is dataclasses.MISSING else f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        help_text = f.metadata.get("help", "")
        if flag_key(f) != f.name and not f.metadata.get("positional"):
            help_text += f" [YAML key {f.name}]"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            help_text += " (required)"
        elif default not in (None, [], False):
            shown = ", ".join(map(str, default)) if isinstance(default, list) else default
            help_text += f" (default: {shown})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind if kind in (int, float) else str
            kwargs["metavar"] = f.metadata.get("metavar", flag_name(f).lstrip("-").replace("-", "_").upper())
            if is_list and f.metadata.get("nargs"):
                kwargs["nargs"] = f.metadata["nargs"]
            elif is_list:
                kwargs["action"] = "append"
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("positional"):
            kwargs.pop("dest")
            target.add_argument(f.name, nargs="?", **kwargs)
        else:
            target.add_argument(flag_name(f), **kwargs)


def _check_keys(cls: type, values: dict[str, Any], where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def build_config(cls: type[C], cli_values: dict[str, Any], config_file: str | None = None) -> C:
    """YAML file values, overridden by the flags that were given, into a ``cls`` instance."""

    values: dict[str, Any] = {}
    if config_file:
        loaded = _accept_flag_spellings(cls, read_yaml_mapping(config_file), config_file)
        _check_keys(cls, loaded, config_file)
        values.update(loaded)
    values.update({k: v for k, v in cli_values.items() if v is not None})
    missing = [
        flag_name(f)
        for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join(missing)}")
    try:
        return from_dict(cls, values)
    except ConfigError as err:
        raise ConfigError(f"{config_file}: {err}" if config_file else str(err)) from None


def from_dict(cls: type[C], values: Any, path: str = "") -> C:
    """Builds a (possibly nested) config dataclass from plain YAML values, checking every key and type.

    Nested dataclasses, ``list[SomeConfig]`` and ``X | None`` fields are followed; an error names the
    full key path, e.g. ``teachers[2].sampling.temprature: unknown key; did you mean 'temperature'?``.
    """
    where = path or "config"
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__} {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(names)}"
            raise ConfigError(f"{path + '.' if path else ''}{key}: unknown key; {hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key_path = f"{path}.{f.name}" if path else f.name
        if f.name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key_path}: missing required key")
            continue
        kwargs[f.name] = _convert(hints[f.name], values[f.name], key_path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def _convert(annotation: Any, value: Any, path: str) -> Any:
    kind, is_list = _base_type(annotation)
    optional = type(None) in typing.get_args(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: may not be null")
    if is_list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_convert(kind, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, path)
    if typing.get_origin(kind) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_kind, value_kind = typing.get_args(kind)
        return {_convert(key_kind, k, path): _convert(value_kind, v, f"{path}.{k}") for k, v in value.items()}
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if kind in (int, float):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind is int and not float(value).is_integer())
        ):
            raise ConfigError(f"{path}: expected {kind.__name__}, got {value!r}")
        return kind(value)
    if kind is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `reward_shift: 1.5`, `revision: 2024`
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def dump_config(config: Any, path: str | Path) -> None:
    """Writes the resolved config as YAML next to a command's output (atomically)."""
    import yaml

    from magpie_teach.artefacts import write_atomic

    text = yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
