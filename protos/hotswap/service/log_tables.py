"""Arrow table helpers shared by the engine's inference log and the control plane's merge of
engines' logs."""

from __future__ import annotations

import pyarrow as pa


def concat_logs(tables: list[pa.Table]) -> pa.Table:
    """Concatenates log tables of different versions (missing columns become nulls)."""
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # fixed_size_list and list columns of the same values do not unify: widen the fixed.
        return pa.concat_tables([_widen(t) for t in tables], promote_options="permissive")


def _widen(table: pa.Table) -> pa.Table:
    fields = [
        pa.field(f.name, pa.list_(f.type.value_type)) if pa.types.is_fixed_size_list(f.type) else f
        for f in table.schema
    ]
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))
