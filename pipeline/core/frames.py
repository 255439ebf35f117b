"""Table columns declared once, on the typed records they come from.

A field annotated with one of the aliases below (`layer: Int32`, `corr_all: Float64 | None`) says
both what the code holds and which polars dtype its column has; `schema_of` reads the dtypes off
the dataclass, so a record and the frame built from it cannot drift apart. A field's
`metadata={"doc": ...}` says what its column means (`column_docs`), for the Dagster UI's column
schema.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Annotated, Any

import polars as pl

Int8 = Annotated[int, pl.Int8]
Int16 = Annotated[int, pl.Int16]
Int32 = Annotated[int, pl.Int32]
Int64 = Annotated[int, pl.Int64]
Float64 = Annotated[float, pl.Float64]
Str = Annotated[str, pl.String]


def _dtype(hint: Any, where: str) -> Any:
    """The polars dtype an annotation carries, looking through `X | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(found) == 1:
            return _dtype(found[0], where)
    if typing.get_origin(hint) is Annotated:
        dtype = hint.__metadata__[0]
        if isinstance(dtype, pl.DataType) or (isinstance(dtype, type) and issubclass(dtype, pl.DataType)):
            return dtype
    raise TypeError(f"{where} is annotated {hint!r}: use an alias of pipeline.core.frames (Int32, Float64, Str, ...)")


def schema_of(record: type, names: typing.Iterable[str] | None = None) -> dict[str, Any]:
    """Column name -> polars dtype of a dataclass's fields (or just `names`, in that order)."""
    hints = typing.get_type_hints(record, include_extras=True)
    fields = [f.name for f in dataclasses.fields(record)]
    chosen = fields if names is None else list(names)
    missing = [n for n in chosen if n not in fields]
    if missing:
        raise KeyError(f"{record.__name__} has no field {missing}")
    return {name: _dtype(hints[name], f"{record.__name__}.{name}") for name in chosen}


def column_docs(record: type) -> dict[str, str]:
    """Column name -> meaning, from the fields' `metadata={"doc": ...}`; a `<name>_reason` field
    without one says why `<name>` is NULL."""
    fields = {f.name: f for f in dataclasses.fields(record)}
    docs = {name: f.metadata["doc"] for name, f in fields.items() if "doc" in f.metadata}
    for name in fields:
        base = name.removesuffix("_reason")
        if name not in docs and base != name and base in fields:
            docs[name] = f"why {base} is NULL (NULL when it has a value)"
    return docs
