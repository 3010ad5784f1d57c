"""Build an `ExperimentConfig` from defaults, a YAML file and ``key=value`` overrides.

Later sources win. Overrides come in the seed's form ``trainer.ppo.async_training=True`` or as
``--trainer.ppo.async_training True``. Parsing and type conversion of overrides is done by
simple-parsing; before that, every key (from the file or the command line) is checked against the
dataclass tree so a typo gets a "did you mean" instead of being silently ignored.

Compute nodes only *read* a resolved config (`load_resolved`), which needs nothing but PyYAML,
so simple-parsing is imported only where a user's input is parsed.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from areal_hpc.config.errors import ConfigError, did_you_mean
from areal_hpc.config.schema import ExperimentConfig


# ----------------------------------------------------------------- the key tree

def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp) -> Tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def field_types(cls=ExperimentConfig, prefix: str = "") -> Dict[str, Any]:
    """Every leaf key of the tree, dotted, with its declared type."""
    out: Dict[str, Any] = {}
    for name, tp in _hints(cls).items():
        inner, _ = _strip_optional(tp)
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(inner):
            out.update(field_types(inner, key + "."))
        else:
            out[key] = tp
    return out


def section_keys(cls=ExperimentConfig, prefix: str = "") -> List[str]:
    out = []
    for name, tp in _hints(cls).items():
        inner, _ = _strip_optional(tp)
        if dataclasses.is_dataclass(inner):
            out.append(prefix + name)
            out.extend(section_keys(inner, f"{prefix}{name}."))
    return out


def _type_name(tp) -> str:
    inner, opt = _strip_optional(tp)
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    return f"{name} or null" if opt else name


def _check_value(key: str, tp, value: Any) -> None:
    """Type-check a value from YAML (the command line is checked by simple-parsing)."""
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return
        raise ConfigError(key, "must not be null", f"give a {_type_name(tp)}")
    origin = typing.get_origin(inner)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
    }.get(inner)
    if origin in (list, List):
        ok = lambda v: isinstance(v, list)  # noqa: E731
    elif origin in (dict, Dict):
        ok = lambda v: isinstance(v, dict)  # noqa: E731
    if ok is not None and not ok(value):
        raise ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _flatten(d: Dict[str, Any], types: Dict[str, Any], sections: List[str], prefix: str = "",
             source: str = "", unknown_ok: bool = False) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if key in types:
            _check_value(key, types[key], v)
            out[key] = v
        elif key in sections:
            if v is None:
                continue
            if not isinstance(v, dict):
                raise ConfigError(key, f"is a section, expected a mapping, got {v!r}{source}")
            out.update(_flatten(v, types, sections, key + ".", source, unknown_ok))
        elif not unknown_ok:
            raise ConfigError(key, f"unknown key{source}", did_you_mean(key, list(types) + sections))
    return out


# ----------------------------------------------------------------- reading YAML files

MAX_CONFIG_BYTES = 1 << 20  # a config is a small text file; anything bigger is the wrong file


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that ``1:30:00`` stays the string it looks like: YAML 1.1 reads
    it as the base-60 integer 5400, which as `cluster.time` would silently mean 5400 minutes."""


def _no_sexagesimal(kind):
    base = yaml.SafeLoader.yaml_constructors[f"tag:yaml.org,2002:{kind}"]

    def construct(loader, node):
        if ":" in str(node.value):
            return loader.construct_scalar(node)
        return base(loader, node)
    return construct


_Loader.add_constructor("tag:yaml.org,2002:int", _no_sexagesimal("int"))
_Loader.add_constructor("tag:yaml.org,2002:float", _no_sexagesimal("float"))


def _check_duplicates(node: yaml.Node, source: str, path: str = "") -> None:
    """A key given twice in one mapping is an error (YAML loaders silently keep the last one)."""
    if isinstance(node, yaml.MappingNode):
        seen: Dict[str, int] = {}
        for k, v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else None
            key = f"{path}.{name}" if path and name is not None else (name or path)
            if name is not None and name != "<<":
                line = k.start_mark.line + 1
                if name in seen:
                    raise ConfigError(key, f"given twice in {source} (lines {seen[name]} and {line})",
                                      "keep one of them")
                seen[name] = line
            _check_duplicates(v, source, key)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicates(item, source, path)


def read_yaml_file(path: str | os.PathLike, key: str = "config") -> Any:
    """A user's YAML file, checked: a regular text file of sane size, valid YAML, no duplicate keys.
    Every problem is a `ConfigError` naming ``key``."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(key, f"{str(path)!r} is a directory", "give the path of a YAML file, e.g. configs/quickstart.yaml")
    if not p.is_file():
        what = "not found" if not p.exists() else "not a regular file"
        raise ConfigError(key, f"file {str(path)!r} {what}", "give the path of a YAML file, e.g. configs/quickstart.yaml")
    size = p.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(key, f"{path} is {size / 2**20:.1f} MiB, too large for a config file",
                          f"a config is a small YAML file (at most {MAX_CONFIG_BYTES >> 20} MiB)")
    raw = p.read_bytes()
    nul = raw.find(b"\0")
    try:
        if nul >= 0:
            raise UnicodeDecodeError("utf-8", raw, nul, nul + 1, "NUL byte")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(key, f"{path} is not a text file (binary data at byte {e.start})",
                          "give a YAML config file (UTF-8 text)") from None
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_duplicates(node, str(path))
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(key, f"{path} is not valid YAML: {' '.join(str(e).split())}") from None


# ----------------------------------------------------------------- dict <-> dataclass

def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: Dict[str, Any], prefix: str = ""):
    """Build a dataclass tree from a (validated) nested dict; missing keys keep defaults."""
    kwargs = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, _ = _strip_optional(hints[f.name])
        v = data[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = from_dict(tp, v, f"{prefix}{f.name}.")
        elif tp is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        elif tp is str and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)  # `trial_name: 1` in YAML
        kwargs[f.name] = v
    return cls(**kwargs)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def load_resolved(path: str | os.PathLike) -> ExperimentConfig:
    """Read the resolved config a run dir holds (what `serve`/`train`/`driver`/`status` start from).
    A damaged file is a `ConfigError` naming it; keys this version does not know are ignored (a run
    written by another version stays readable)."""
    hint = "the run dir's config.yaml is damaged: restore it, or start a new trial_name"
    raw = Path(path).read_bytes()
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.find(b"\0"), raw.find(b"\0") + 1, "NUL byte")
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(str(path), "is not a text file (binary data)", hint) from None
    except yaml.YAMLError as e:
        raise ConfigError(str(path), f"is not valid YAML: {' '.join(str(e).split())}", hint) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"must hold a mapping of keys, not {type(data).__name__}", hint)
    try:
        _flatten(data, field_types(), section_keys(), unknown_ok=True)
    except ConfigError as e:
        raise ConfigError(str(path), f"is damaged: {e.one_line()}", hint) from None
    return from_dict(ExperimentConfig, data)


# ----------------------------------------------------------------- the user's input

def _split_overrides(args: Sequence[str]) -> List[Tuple[str, str]]:
    """``a.b=c`` and ``--a.b c`` / ``--a.b=c`` -> [(key, raw value)]."""
    pairs, i = [], 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            body = a[2:]
            if "=" in body:
                k, v = body.split("=", 1)
            elif i + 1 < len(args) and not (args[i + 1].startswith("--") or "=" in args[i + 1]):
                k, v = body, args[i + 1]
                i += 1
            else:
                raise ConfigError(body, "option needs a value", f"write --{body} VALUE or {body}=VALUE")
            pairs.append((k.replace("-", "_") if "." not in k else k, v))
        elif "=" in a:
            k, v = a.split("=", 1)
            pairs.append((k, v))
        else:
            raise ConfigError("", f"cannot understand argument {a!r}",
                              "overrides look like key=value, e.g. trainer.ppo.async_training=False")
        i += 1
    return pairs


def _yaml_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _parse_with_simple_parsing(file_layer: Dict[str, Any], cli: List[Tuple[str, str]]) -> ExperimentConfig:
    from simple_parsing import ArgumentParser
    from simple_parsing.wrappers.field_wrapper import ArgumentGenerationMode, NestedMode

    class _Parser(ArgumentParser):
        def error(self, message: str):  # argparse would print usage and exit; we want one line
            key = ""
            if message.startswith("argument --"):
                key, _, message = message[len("argument --"):].partition(": ")
                key = key.split("/")[0]  # bools are listed as `--a.b/--a.nob`
            raise ConfigError(key, message.strip().rstrip("."))

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(file_layer, f)
        layer_path = f.name
    try:
        parser = _Parser(nested_mode=NestedMode.WITHOUT_ROOT,
                         argument_generation_mode=ArgumentGenerationMode.NESTED,
                         config_path=layer_path, add_config_path_arg=False, add_help=False)
        parser.add_arguments(ExperimentConfig, dest="cfg")
        argv: List[str] = []
        for k, v in cli:
            argv.append(f"--{k}={v}")
        return parser.parse_args(argv).cfg
    finally:
        os.unlink(layer_path)


def _unflatten(flat: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, v in flat.items():
        d = out
        *parents, leaf = key.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


def load_config(config_file: Optional[str], overrides: Sequence[str]) -> ExperimentConfig:
    """defaults < YAML file < overrides, every key checked. Raises ConfigError."""
    types, sections = field_types(), section_keys()
    flat: Dict[str, Any] = {}
    if config_file:
        data = read_yaml_file(config_file) or {}
        if not isinstance(data, dict):
            raise ConfigError("config", f"{config_file} must hold a mapping of keys, not {type(data).__name__}")
        flat.update(_flatten(data, types, sections, source=f" in {config_file}"))

    cli: List[Tuple[str, str]] = []
    given: Dict[str, str] = {}
    for key, raw in _split_overrides(overrides):
        if key in given:
            raise ConfigError(key, f"given twice on the command line ({key}={given[key]} and {key}={raw})",
                              "keep one of them")
        given[key] = raw
        if key in types:
            inner, optional = _strip_optional(types[key])
            origin = typing.get_origin(inner)
            value = _yaml_scalar(raw)
            # Lists, dicts and explicit nulls are YAML values; simple-parsing takes the scalars.
            if origin in (list, List, dict, Dict) or (optional and value is None):
                if origin in (list, List) and not isinstance(value, list):
                    value = [] if raw == "" else [value]
                _check_value(key, types[key], value)
                flat[key] = value
                continue
            if inner is str and value is None and not optional:
                raise ConfigError(key, "must not be null")
            flat.pop(key, None)
            cli.append((key, raw))
            continue
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if parent in types and typing.get_origin(_strip_optional(types[parent])[0]) in (dict, Dict):
            sub = dict(flat.get(parent) or {})
            sub[key.rsplit(".", 1)[1]] = raw
            flat[parent] = sub
            continue
        raise ConfigError(key, "unknown key", did_you_mean(key, list(types)))
    cfg = _parse_with_simple_parsing(_unflatten(flat), cli)
    # simple-parsing treats a null in its config layer as "not given": apply explicit nulls here.
    for key, value in flat.items():
        if value is None:
            *parents, leaf = key.split(".")
            obj = cfg
            for p in parents:
                obj = getattr(obj, p)
            setattr(obj, leaf, None)
    return cfg
