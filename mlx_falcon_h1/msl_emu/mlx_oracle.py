"""The exact Metal source the installed MLX generates for a kernel call -- without Metal.

`mx.fast.metal_kernel(...)` can be called without a Metal device while
`mx.export_function` traces (MLX >= 0.31): the kernel is recorded on a
placeholder GPU stream, and `verbose=True` makes MLX print the generated
source (header + signature + body + explicit instantiation) on the C++
standard output, which we capture at the file-descriptor level.
"""

from __future__ import annotations

import os
import re
import tempfile


def mlx_generated_source(name, input_names, output_names, source, inputs, output_shapes,
                         output_dtypes, grid, threadgroup, template=None, header="",
                         ensure_row_contiguous=True, atomic_outputs=False) -> str:
    """inputs: mx arrays (only shape and dtype matter) or Python scalars."""
    import mlx.core as mx

    kernel = mx.fast.metal_kernel(
        name=name, input_names=input_names, output_names=output_names, source=source,
        header=header, ensure_row_contiguous=ensure_row_contiguous, atomic_outputs=atomic_outputs)
    inputs = list(inputs)
    array_idx = [i for i, x in enumerate(inputs) if isinstance(x, mx.array)]

    def traced(*arrays):
        ins = list(inputs)
        for i, a in zip(array_idx, arrays):
            ins[i] = a
        return kernel(inputs=ins, output_shapes=output_shapes, output_dtypes=output_dtypes,
                      grid=grid, threadgroup=threadgroup, template=template or None, verbose=True)

    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryFile(mode="w+b") as cap:
        saved = os.dup(1)
        os.dup2(cap.fileno(), 1)
        try:
            mx.export_function(os.path.join(d, "k.mlxfn"), traced, *[inputs[i] for i in array_idx])
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        cap.seek(0)
        text = cap.read().decode()
    m = re.search(r"Generated source code for `[^`]*`:\n```\n(.*)\n```\n", text, re.S)
    if not m:
        raise RuntimeError("MLX did not print a generated source:\n" + text[-2000:])
    return m.group(1)
