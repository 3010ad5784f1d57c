"""Build an `ExperimentConfig` from defaults, a YAML file and ``key=value`` overrides (later wins), every key checked.

The file and the YAML-valued overrides (lists, mappings, ``null``) go through `from_dict`; simple-parsing parses the
scalar overrides over the result. Not simple-parsing for all of it: from the command line it cannot give a field
null, read ``[a, b]`` or fill a Dict field, and it keeps the last of a key given twice; its config-file layer drops
nulls, passes values on unchecked and names an unknown key without a hint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from areal_hpc.config.errors import ConfigError, did_you_mean
from areal_hpc.config.schema import ExperimentConfig


def _strip_optional(tp) -> Tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def key_tree(cls=ExperimentConfig, prefix: str = "") -> Tuple[Dict[str, Any], List[str]]:
    """Every dotted key of the tree: ({leaf: declared type}, [section])."""
    leaves: Dict[str, Any] = {}
    sections: List[str] = []
    for name, tp in typing.get_type_hints(cls).items():
        inner, _ = _strip_optional(tp)
        if dataclasses.is_dataclass(inner):
            sub_leaves, sub_sections = key_tree(inner, f"{prefix}{name}.")
            leaves.update(sub_leaves)
            sections += [prefix + name, *sub_sections]
        else:
            leaves[prefix + name] = tp
    return leaves, sections


def _type_name(tp) -> str:
    inner, opt = _strip_optional(tp)
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    return f"{name} or null" if opt else name


MAX_CONFIG_BYTES = 1 << 20  # a config is a small text file; anything bigger is the wrong file


class _Float(float):
    """A float that keeps its YAML text, for a string field: `trial_name: 1.10` is "1.10", not "1.1"."""

    text = ""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that ``1:30:00`` (base-60 5400 to YAML 1.1: `cluster.time` of 5400 minutes) and
    ``01`` (octal 1: `trial_name: 01` was the run dir .../1) stay strings."""

    def construct_yaml_int(self, node):
        if ":" in node.value or re.fullmatch(r"[-+]?0[0-9_]+", node.value):
            return self.construct_scalar(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        if ":" in node.value:
            return self.construct_scalar(node)
        value = _Float(super().construct_yaml_float(node))
        value.text = node.value
        return value


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


class _Dumper(yaml.SafeDumper):
    """Quotes the strings `_Loader` would read as numbers: `trial_name=1e-5` reads back from the run dir as written."""


_Dumper.add_representer(_Float, yaml.SafeDumper.represent_float)  # in a mapping inside a Dict field


# `lr: 1e-5` is a float (YAML 1.2, and what everyone means); YAML 1.1 wants a dot and reads a string
for _yaml in (_Loader, _Dumper):
    _yaml.add_implicit_resolver("tag:yaml.org,2002:float",
                                re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
                                list("-+0123456789."))


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


def read_yaml_file(path: str | os.PathLike, key: str = "config", hint: Optional[str] = None) -> Dict[str, Any]:
    """A YAML mapping from a user's file: a regular text file of sane size, valid YAML, no key given twice. Every
    problem is a `ConfigError` naming ``key`` (and the file, unless ``key`` is it)."""
    p = Path(os.path.expanduser(path))  # `--config=~/my.yaml`: the shell leaves a ~ after `=` as it is
    name = "" if key == str(path) else f"{path} "
    try:  # OSError: no permission to read the file (or to look into its directory), and the like
        if not p.is_file():
            what = "is a directory" if p.is_dir() else "not found" if not p.exists() else "is not a regular file"
            raise ConfigError(key, f"{name}{what}", hint or "give a YAML file's path; the docs' configs/ are in the "
                              "source checkout, not in an installed wheel")
        if (size := p.stat().st_size) > MAX_CONFIG_BYTES:
            raise ConfigError(key, f"{name}is {size / 2**20:.1f} MiB, too large for a config file",
                              hint or f"a config is a small YAML file (at most {MAX_CONFIG_BYTES >> 20} MiB)")
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(key, f"{name}cannot be read: {e.strerror or e}", hint or "check its permissions") from None
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.find(b"\0"), raw.find(b"\0") + 1, "NUL byte")
        loader = _Loader(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(key, f"{name}is not a text file (binary data at byte {e.start})",
                          hint or "give a YAML config file (UTF-8 text)") from None
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_duplicates(node, str(path))
        data = {} if node is None else loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(key, f"{name}is not valid YAML: {' '.join(str(e).split())}", hint) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(key, f"{name}must hold a mapping of keys, not {type(data).__name__}", hint)
    return data


def _value(key: str, tp, value: Any, old: Any) -> Any:
    """``value`` (from YAML) as a field declared ``tp`` holds it, or a `ConfigError` naming ``key``."""
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(key, "must not be null", f"give a {_type_name(tp)}")
    origin = typing.get_origin(inner)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is dict and isinstance(value, dict):  # a mapping adds to (or overrides entries of) what is there
        def text(v: Any) -> Any:  # a float as written (command-line words: `mem-fraction-static: 0.80` is "0.80")
            return [text(x) for x in v] if isinstance(v, list) else getattr(v, "text", v)
        keep = typing.get_args(inner)[1] is not str  # a mapping of any values (chat_template_kwargs) keeps YAML's types
        return {**(old or {}), **{k: v if keep else text(v) for k, v in value.items()}}
    if origin is list and isinstance(value, list):  # each item checked: `stop_token_ids: [a]` is no list of ints
        (item,) = typing.get_args(inner)
        return [_value(f"{key}[{i}]", item, v, None) for i, v in enumerate(value)]
    if (inner is bool and isinstance(value, bool)) or (inner is int and number and isinstance(value, int)):
        return value
    if inner is float and number:
        return float(value)
    if inner is str and (isinstance(value, str) or number):
        return getattr(value, "text", str(value))  # `trial_name: 1` in YAML
    if origin in (dict, list) or inner in (bool, int, float, str):
        got = "float" if isinstance(value, float) else type(value).__name__  # (not _Float, the loader's own)
        raise ConfigError(key, f"expected {_type_name(tp)}, got {got} {value!r}")
    return value


def from_dict(cls, data: Dict[str, Any], base=None, source: str = "", strict: bool = True, prefix: str = ""):
    """The one deserializer: ``base`` (default ``cls()``) with the nested mapping ``data`` applied, every value checked
    against its declared type. An unknown key is an error with a "did you mean", or ignored with ``strict=False``."""
    obj = copy.deepcopy(base) if base is not None else cls()
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            if strict:
                leaves, sections = key_tree()
                if "." in name and (key in leaves or key in sections):  # `cluster.n_nodes: 2`, an override's spelling
                    parts = name.split(".")  # "did you mean 'cluster.n_nodes'?" would repeat it
                    raise ConfigError(key, f"is one dotted key{source}", "nest it in the YAML file: "
                                      + ": {".join(parts) + ": ...}" + "}" * (len(parts) - 2))
                raise ConfigError(key, f"unknown key{source}", did_you_mean(key, list(leaves) + sections))
            continue
        inner, _ = _strip_optional(hints[name])
        if not dataclasses.is_dataclass(inner):
            setattr(obj, name, _value(key, hints[name], value, getattr(obj, name)))
        elif isinstance(value, dict):
            setattr(obj, name, from_dict(inner, value, getattr(obj, name), source, strict, key + "."))
        elif value is not None:
            raise ConfigError(key, f"is a section, expected a mapping, got {value!r}{source}")
    return obj


def dump_yaml(cfg) -> str:
    return yaml.dump(dataclasses.asdict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def load_resolved(path: str | os.PathLike) -> ExperimentConfig:
    """The resolved config of a run dir (what `serve`/`train`/`driver`/`status` start from). Unknown keys are
    ignored: a run written by another version stays readable."""
    hint = "the run dir's config.yaml is damaged: restore it, or start a new trial_name"
    data = read_yaml_file(path, key=str(path), hint=hint)
    try:
        return from_dict(ExperimentConfig, data, strict=False)
    except ConfigError as e:
        raise ConfigError(str(path), f"is damaged: {e.one_line()}", hint) from None


_KEY_VALUE = re.compile(r"[A-Za-z_][\w.-]*=")  # a config word `a.b=c`


def _dict_entry(leaves: Dict[str, Any], key: str) -> bool:
    """``key`` names one entry of a Dict field: `server.sglang_args.attention-backend`."""
    return typing.get_origin(leaves.get(key.rpartition(".")[0])) is dict


def split_words(words: Sequence[str]) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """Config words (``CONFIG.yaml`` or ``--config FILE``, ``a.b=c``, ``--a.b c``, ``--a.b=c``) -> (CONFIG file,
    [(dotted key, raw value)])."""
    config: Optional[str] = None
    pairs: List[Tuple[str, str]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("--"):
            flag, eq, raw = word[2:].partition("=")
            key = flag if "." in flag else flag.replace("-", "_")
            if not eq:
                # the next word is the next key=value, not this option's value; a value may hold '=' ("export A=1")
                if i + 1 >= len(words) or words[i + 1].startswith("--") or _KEY_VALUE.match(words[i + 1]):
                    leaves = key_tree()[0]
                    if key not in leaves and key != "config" and not _dict_entry(leaves, key):  # `--dryrun`: a typo
                        raise ConfigError(flag, "is not an option of this command, nor a config key", "see its --help")
                    raise ConfigError(flag, "option needs a value", f"write --{flag} VALUE or {flag}=VALUE")
                i += 1
                raw = words[i]
        elif "=" in word:
            key, _, raw = word.partition("=")
        elif word.endswith((".yaml", ".yml")):
            key, raw = "config", word
        else:
            raise ConfigError("", f"unexpected argument {word!r}", "at most one CONFIG.yaml, then key=value overrides")
        if not key:  # `=5`, `--=5`: not "unknown key" with no key named
            raise ConfigError("", f"{word!r} has no key before '='", "write key=value, e.g. trial_name=t2")
        if key != "config":
            pairs.append((key, raw))
        elif config is not None:
            raise ConfigError("config", f"two config files ({config} and {raw})", "give one")
        else:
            config = raw
        i += 1
    return config, pairs


def _parse_scalars(argv: List[str], base: ExperimentConfig) -> ExperimentConfig:
    """``--a.b=c`` words for scalar fields, each converted by its field's type, over ``base`` (passed as the dataclass
    default, so its nulls, lists and mappings stay as they are)."""
    from simple_parsing import ArgumentParser  # imported here: compute nodes (load_resolved) need only PyYAML
    from simple_parsing.wrappers.field_wrapper import ArgumentGenerationMode, NestedMode

    class _Parser(ArgumentParser):
        def error(self, message: str):  # argparse would print usage and exit; we want one line
            key = ""
            if message.startswith("argument --"):
                key, _, message = message[len("argument --"):].partition(": ")
                key = key.split("/")[0]  # bools are listed as `--a.b/--a.nob`
            raise ConfigError(key, message.strip().rstrip("."))

    parser = _Parser(nested_mode=NestedMode.WITHOUT_ROOT, argument_generation_mode=ArgumentGenerationMode.NESTED,
                     add_config_path_arg=False, add_help=False, allow_abbrev=False)
    parser.add_arguments(ExperimentConfig, dest="cfg", default=base)
    return parser.parse_args(argv).cfg


def _flow_collection(key: str, raw: str) -> Any:
    """``raw`` read as YAML if it is a ``[...]`` list or ``{...}`` mapping, else ``raw`` itself."""
    if not raw.lstrip().startswith(("[", "{")):
        return raw
    try:
        return yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(key, f"{raw!r} is not a YAML list or mapping ({str(e).splitlines()[0]})",
                          "write a list as [a, b], a mapping as {k: v}") from None


def _nest(data: Dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


# Paths a YAML file may write with $VAR / ${VAR}: no shell expands them there (`fileroot: $SCRATCH/areal` was a
# directory named `$SCRATCH` in the working directory).
PATH_KEYS = ("cluster.fileroot", "cluster.hf_cache", "cluster.python", "server.model_path", "trainer.ppo.actor.path",
             "trainer.sft.model.path", "train_dataset.path", "valid_dataset.path")


def _expand_vars(cfg: ExperimentConfig) -> ExperimentConfig:
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        owner = functools.reduce(getattr, parents, cfg)
        value = getattr(owner, leaf)
        expanded = os.path.expandvars(value)
        if ref := re.search(r"\$\{(\w+(?:\.\w+)+)\}", expanded):  # AReaL's (OmegaConf's) `${actor.path}`
            raise ConfigError(key, f"{value!r} refers to the key {ref[1]}: keys are not interpolated", "write it out")
        if unset := re.search(r"\$\{?(\w+)", expanded):  # expandvars leaves unset variables as written
            raise ConfigError(key, f"{value!r} names the environment variable ${unset[1]}, which is not set",
                              "set it, or write the path out")
        setattr(owner, leaf, expanded)
    return cfg


def load_config(config_file: Optional[str], words: Sequence[str]) -> ExperimentConfig:
    """defaults < YAML file < overrides (the command line's config words, which may name the file instead)."""
    if config_file:
        words = [f"--config={config_file}", *words]
    config_file, pairs = split_words(words)
    cfg = ExperimentConfig()
    if config_file:
        cfg = from_dict(ExperimentConfig, read_yaml_file(config_file), source=f" in {config_file}")

    leaves, _ = key_tree()
    given: Dict[str, str] = {}
    yaml_valued: Dict[str, Any] = {}
    scalars: List[str] = []
    for key, raw in pairs:
        if key in given:
            raise ConfigError(key, f"given twice on the command line ({key}={given[key]} and {key}={raw})",
                              "keep one of them")
        given[key] = raw
        if key in leaves:
            origin = typing.get_origin(_strip_optional(leaves[key])[0])
            try:  # `valid_dataset.path=` empties a string field (YAML reads null)
                value = raw if raw == "" and leaves[key] is str else yaml.load(raw, Loader=_Loader)
            except yaml.YAMLError:  # a list's or mapping's broken [..: refused, not kept as one item of text
                value = _flow_collection(key, raw) if origin in (list, dict) else raw
            if origin is list and not isinstance(value, list):
                value = [] if raw == "" else [value]
            if origin in (list, dict) or value is None:
                _nest(yaml_valued, key, value)
            else:
                scalars.append(f"--{key}={raw}")
        elif _dict_entry(leaves, key):
            # a scalar keeps its text (the flag's value as typed), null is null; a list or mapping is YAML, as in a file
            value = None if raw.strip() in ("null", "Null", "NULL", "~") else _flow_collection(key, raw)
            if typing.get_args(leaves[key.rpartition(".")[0]])[1] is not str:  # a mapping of any values: all is YAML
                with contextlib.suppress(yaml.YAMLError):  # `chat_template_kwargs.enable_thinking=false` a bool
                    value = yaml.load(raw, Loader=_Loader)
            _nest(yaml_valued, key, value)
        elif section := [k for k in leaves if k.startswith(key + ".")]:  # not "unknown key (did you mean ...)"
            raise ConfigError(key, "is a section, not a key", f"set its keys one by one, e.g. {section[0]}=...")
        else:
            raise ConfigError(key, "unknown key", did_you_mean(key, list(leaves)))
    return _expand_vars(_parse_scalars(scalars, from_dict(ExperimentConfig, yaml_valued, base=cfg)))
