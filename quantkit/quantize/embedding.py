"""Embedding tables stored int8, one scale per row, dequantized after the lookup.

A DequantizeLinear in front of the Gather would turn the whole table back to float on every run
(30522 x 384 values for a BERT vocabulary, about as long as the rest of a small encoder); here
only the rows looked up are scaled:

    Gather(table, ids)  ->  Cast(Gather(table_int8, ids), float) * Gather(row_scale[V, 1], ids)

Plain ONNX ops, exact (the row scale multiplies int8 codes, as DequantizeLinear with zero point 0
would), and negative ids index both tables alike.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from quantkit.graph.ir_edit import Editor
from quantkit.quantize import qparams as qp


def quantize_table(edit: Editor, node: ir.Node, cache: dict[str, tuple[ir.Value, ir.Value]],
                   memo: qp.WeightMemo) -> None:
    """Rewrite one embedding Gather (table as input 0, axis 0) in place; tables shared by several
    Gathers are stored once (`cache` keyed by the table's name)."""
    table = node.inputs[0]
    ids = node.inputs[1]
    if table.name not in cache:
        q, scale, _ = memo.quantize(table.const_value, 0)
        cache[table.name] = (edit.initializer(f"{table.name}_quantized", q),
                             edit.initializer(f"{table.name}_row_scale", scale.astype(np.float32).reshape(-1, 1)))
    codes, scales = cache[table.name]
    base = node.name or node.outputs[0].name
    rows = edit.node("Gather", [codes, ids], {"axis": 0}, name=f"{base}_int8_rows")
    wide = edit.node("Cast", [rows.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{base}_rows_to_float")
    row_scale = edit.node("Gather", [scales, ids], {"axis": 0}, name=f"{base}_row_scales")
    scaled = edit.node("Mul", [wide.outputs[0], row_scale.outputs[0]], name=f"{base}_dequantized_rows")
    edit.graph.insert_before(node, [rows, wide, row_scale])
    edit.replace_node(node, scaled)
