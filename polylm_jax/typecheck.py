"""Field types of the configuration dataclasses, checked when they are built.

gin passes whatever a binding says (`TrainerConfig.num_steps = 'forty'`); without a check the
mistake surfaces as a traceback deep in the run. Every config dataclass calls `check_fields(self)`
in `__post_init__`, so a wrong type fails at start with the setting's gin name.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any


@functools.lru_cache(maxsize=None)
def _hints(cls: Any) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _matches(value: Any, hint: Any) -> bool:
  if hint is Any:
    return True
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    return any(_matches(value, a) for a in args)
  if hint is type(None):
    return value is None
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if origin in (tuple, list, typing.Sequence) or hint in (tuple, list):
    if not isinstance(value, (tuple, list)):
      return False
    if origin is tuple and args and args[-1] is not Ellipsis:
      return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    inner = args[0] if args else Any
    return all(_matches(v, inner) for v in value)
  if origin is dict or hint is dict:
    if not isinstance(value, dict):
      return False
    if len(args) == 2:
      return all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return True
  if isinstance(hint, type):
    return isinstance(value, hint)
  return True  # anything more exotic is not checked here


def _describe(hint: Any) -> str:
  if isinstance(hint, type):
    return hint.__name__
  return str(hint).replace("typing.", "")


def check_fields(obj: Any, name: str | None = None) -> None:
  """Raises TypeError naming `<Class>.<field>` when a field's value does not fit its annotation."""
  cls = type(obj)
  hints = _hints(cls)  # type: ignore[arg-type]
  for field in dataclasses.fields(obj):
    value = getattr(obj, field.name)
    hint = hints.get(field.name, Any)
    if not _matches(value, hint):
      raise TypeError(
        f"{name or cls.__name__}.{field.name} = {value!r}: expected "
        f"{_describe(hint)}, got {type(value).__name__}"
      )
