"""Command-line overrides of run.Config trees in NeMo-Run's syntax, typed by the dataclass fields.

`key=value` sets a field by its dotted path (`optimizer.lr=1e-4`); `key+=v`, `-=`, `*=`, `/=`
combine with the current value (NeMo-Run's operators). Values are parsed to the field's annotated
type: int, float, bool, str, `X | None` (`None` clears it), `tuple[X, ...]` / `list[X]` (`[a,b]`).
NeMo-Run 0.11's own parser (nemo_run.cli.cli_parser.parse_value) rejects `X | None`, variadic
tuples and the string annotations of `from __future__ import annotations` modules, which
megatron_ext's config dataclasses use, hence this small typed layer on top of its operators.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["SHORT_NAMES", "Overrides", "apply_overrides", "split_overrides"]

SHORT_NAMES: dict[str, tuple[str, str]] = {
    "tp": ("tensor", "parallel.tensor"),
    "pp": ("pipeline", "parallel.pipeline"),
    "ep": ("expert", "parallel.expert"),
    "cp": ("context", "parallel.context"),
    "steps": ("train_steps", "train_steps"),
    "gbs": ("global_batch_size", "global_batch_size"),
    "mbs": ("micro_batch_size", "micro_batch_size"),
    "lr": ("lr", "optimizer.lr"),
    "min_lr": ("min_lr", "optimizer.min_lr"),
    "seq": ("seq_length", "model.seq_length"),
}
"""Short names: (the recipe argument, the TrainConfig field) each one sets."""

_OVERRIDE = re.compile(r"^(?P<key>[A-Za-z_][\w.\[\]]*?)(?P<op>[-+*/|&]?=)(?P<value>.*)$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Overrides:
    """Command-line overrides sorted by what they change."""

    recipe: dict[str, Any]
    """Arguments of the recipe function (parsed values): the recipe is built with them, so
    values it derives from them (e.g. the decay length from train_steps) follow."""
    config: list[str]
    """`path op= value` items for fields of the built run.Config[TrainConfig]."""
    executor: list[str]
    """`field op= value` items for the executor (given as executor.FIELD=VALUE)."""


def split_overrides(items: Sequence[str], recipe: Callable[..., Any] | None = None) -> Overrides:
    """Sort `key=value` overrides: `executor.*` to the executor; a plain `name=value` whose name
    (or short name: tp, pp, ep, cp, steps, gbs, mbs, lr, min_lr, seq) is an argument of `recipe` to
    the recipe; everything else (dotted paths, operators) to the built configuration.

    Raises:
        ValueError: an item is not KEY=VALUE (KEY op= VALUE with op one of + - * / | &), or a
            recipe argument's value does not parse as its type.
    """
    params, hints = _recipe_params(recipe)
    recipe_args: dict[str, Any] = {}
    config: list[str] = []
    executor: list[str] = []
    for item in items:
        match = _OVERRIDE.match(item)
        if match is None:
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. optimizer.lr=1e-4, tp=2)")
        key, op, text = match["key"], match["op"], match["value"]
        if key.startswith("executor."):
            executor.append(f"{key.removeprefix('executor.')}{op}{text}")
            continue
        arg, path = SHORT_NAMES.get(key, (key, key))
        if op == "=" and arg in params:
            try:
                recipe_args[arg] = _typed_value(text, hints.get(arg, Any))
            except ValueError as exc:
                raise ValueError(f"override {item!r}: {exc}") from None
        else:
            config.append(f"{path}{op}{text}")
    return Overrides(recipe=recipe_args, config=config, executor=executor)


def _recipe_params(recipe: Callable[..., Any] | None) -> tuple[set[str], dict[str, Any]]:
    if recipe is None:
        return set(), {}
    target = recipe.func if isinstance(recipe, functools.partial) else recipe
    bound = set(recipe.keywords) if isinstance(recipe, functools.partial) else set()
    names = {
        name
        for name, p in inspect.signature(recipe).parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name not in bound
    }
    try:
        hints = typing.get_type_hints(target)
    except (NameError, TypeError):
        hints = {}
    return names, hints


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """Apply `key=value` / `key op= value` overrides to a run.Config tree in place (returned).

    Keys are dotted paths through the tree (`optimizer.lr`); values are parsed to the field's
    annotated type (int, float, bool, str, X | None, tuple[X, ...], list[X]); `None` clears an
    optional field; `+= -= *= /=` combine with the current value (NeMo-Run's operators).

    Raises:
        ValueError: a key names no field, or a value does not parse as the field's type (the
            message names the field, the value and the type).
    """
    from nemo_run.cli.cli_parser import Operation, PythonicParser

    parser = PythonicParser()
    for item in overrides:
        match = _OVERRIDE.match(item)
        if match is None:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        key, op, text = match["key"], match["op"], match["value"]
        node, field = _resolve(config, key)
        hint = _field_type(node.__fn_or_cls__, field)
        try:
            value = _typed_value(text, hint)
        except ValueError as exc:
            raise ValueError(f"override {item!r}: {exc}") from None
        if op != "=":
            operation = Operation(op)
            value = parser.apply_operation(operation, getattr(node, field), value)
        setattr(node, field, value)
    return config


def _resolve(config: Any, key: str) -> tuple[Any, str]:
    """The Buildable holding the last field of a dotted key, and that field's name."""
    import fiddle as fdl

    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, fdl.Buildable):
            where = ".".join(parts[:i])
            raise ValueError(  # noqa: TRY004 (a bad command line, reported as such)
                f"override {key!r}: {where} is a value, not a config with fields"
            )
        names = _field_names(node.__fn_or_cls__)
        if part not in names:
            owner = getattr(node.__fn_or_cls__, "__name__", str(node.__fn_or_cls__))
            where = f" (at {'.'.join(parts[:i])})" if i else ""
            raise ValueError(
                f"override {key!r}: {owner} has no field {part!r}{where}; "
                f"fields: {', '.join(sorted(names))}"
            )
        if i == len(parts) - 1:
            return node, part
        node = getattr(node, part)
    raise AssertionError("unreachable")


def _field_names(target: Any) -> set[str]:
    if dataclasses.is_dataclass(target):
        return {f.name for f in dataclasses.fields(target) if f.init}
    return set(inspect.signature(target).parameters)


def _field_type(target: Any, field: str) -> Any:
    try:
        hints = typing.get_type_hints(target)
    except (NameError, TypeError):  # unresolvable annotations: parse as a Python literal
        return Any
    return hints.get(field, Any)


def _typed_value(text: str, hint: Any) -> Any:
    """Parse a command-line value as `hint` (see apply_overrides)."""
    text = text.strip()
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text in ("None", "none", "null"):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _typed_value(text, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if hint is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a bool (true/false)")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an int") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if hint is str:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return text[1:-1]
        return text
    if origin in (tuple, list):
        inner = text[1:-1] if text[:1] in "[(" and text[-1:] in "])" else text
        items = [part.strip() for part in inner.split(",") if part.strip()]
        element = args[0] if args else Any
        values = [_typed_value(part, element) for part in items]
        return tuple(values) if origin is tuple else values
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
