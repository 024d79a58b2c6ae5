"""The Metal source MLX generates for an `mx.fast.metal_kernel` call.

A port of MLX's write_signature / write_template (mlx/backend/common/
metal_kernel.cpp, MLX 0.32): the kernel name with its template and dtype
suffixes, the `[[buffer(i)]]` parameters (inputs, then their `_shape`,
`_strides`, `_ndim` when the body mentions them, then outputs), the thread
attributes the body mentions, the body, and the explicit instantiation.
`tests/test_msl_emu_parity.py` checks it byte for byte against the installed
MLX, so a change in MLX's code generation fails a test instead of silently
desynchronising the emulator from the GPU.
"""

from __future__ import annotations

import numpy as np

MAX_CONSTANT_ARRAY_SIZE = 8  # MLX: inputs with fewer elements go to `constant`

# Same list and order as MLX's metal_kernel (attribute, type).
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

# MLX dtype name -> Metal type name (MLX's get_type_string).
MX_TO_MSL = {
    "float32": "float",
    "float16": "float16_t",
    "bfloat16": "bfloat16_t",
    "bool": "bool",
    "int8": "int8_t",
    "int16": "int16_t",
    "int32": "int32_t",
    "int64": "int64_t",
    "uint8": "uint8_t",
    "uint16": "uint16_t",
    "uint32": "uint32_t",
    "uint64": "uint64_t",
}
MSL_TYPES = set(MX_TO_MSL.values())

# Metal type name -> numpy dtype of the host buffer (bfloat16 travels as its bits).
MSL_TO_NP = {
    "float": np.dtype(np.float32),
    "float16_t": np.dtype(np.float16),
    "bfloat16_t": np.dtype(np.uint16),
    "bool": np.dtype(np.bool_),
    "int8_t": np.dtype(np.int8),
    "int16_t": np.dtype(np.int16),
    "int32_t": np.dtype(np.int32),
    "int64_t": np.dtype(np.int64),
    "uint8_t": np.dtype(np.uint8),
    "uint16_t": np.dtype(np.uint16),
    "uint32_t": np.dtype(np.uint32),
    "uint64_t": np.dtype(np.uint64),
}
_NP_TO_MSL = {
    np.dtype(np.float32): "float",
    np.dtype(np.float16): "float16_t",
    np.dtype(np.bool_): "bool",
    np.dtype(np.int8): "int8_t",
    np.dtype(np.int16): "int16_t",
    np.dtype(np.int32): "int32_t",
    np.dtype(np.int64): "int64_t",
    np.dtype(np.uint8): "uint8_t",
    np.dtype(np.uint16): "uint16_t",
    np.dtype(np.uint32): "uint32_t",
    np.dtype(np.uint64): "uint64_t",
}


def type_string(dtype) -> str:
    """MLX's get_type_string for an mlx dtype, a numpy dtype or a Metal type name."""
    if isinstance(dtype, str):
        if dtype in MSL_TYPES:
            return dtype
        if dtype in MX_TO_MSL:
            return MX_TO_MSL[dtype]
        raise TypeError(f"unknown dtype name {dtype!r}")
    name = str(dtype)
    if name.startswith("mlx.core."):
        return MX_TO_MSL[name.split(".")[-1]]
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"unsupported dtype {dtype!r}") from None
    if np_dtype.name == "bfloat16":  # ml_dtypes, when installed
        return "bfloat16_t"
    if np_dtype not in _NP_TO_MSL:
        raise TypeError(f"unsupported dtype {dtype!r} (Metal has no {np_dtype})")
    return _NP_TO_MSL[np_dtype]


def _template_value(arg) -> str:
    if isinstance(arg, (bool, np.bool_)):
        return str(int(arg))  # ostringstream << bool prints 1/0
    if isinstance(arg, (int, np.integer)):
        return str(int(arg))
    return type_string(arg)


def write_template(template_args) -> str:
    return "<" + ", ".join(_template_value(a) for _, a in template_args) + ">"


def template_hash(template_def: str) -> str:
    """MLX's kernel-name suffix: '<' '>' and ', ' become '_', the last character dropped."""
    out, i = [], 0
    while i < len(template_def):
        c = template_def[i]
        if c in "<>":
            out.append("_")
        elif c == "," and i + 1 < len(template_def) and template_def[i + 1] == " ":
            out.append("_")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)[:-1]


def generate_metal_source(
    name, input_names, output_names, source, header, atomic_outputs, in_meta, output_dtypes,
    template_args,
):
    """(kernel name, full Metal source) exactly as MLX generates them.

    in_meta: per input (Metal type name, ndim, size).
    """
    shape_infos = [
        ((n + "_shape") in source, (n + "_strides") in source, (n + "_ndim") in source)
        for n in input_names
    ]
    attributes = [f"  {t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES if a in source]
    kernel_name = "custom_kernel_" + name
    if template_args:
        kernel_name += "_" + template_hash(write_template(template_args))
    for tstr, ndim, size in in_meta:
        kernel_name += "_" + tstr
        if ndim == 0:
            kernel_name += "s"
        elif size < MAX_CONSTANT_ARRAY_SIZE:
            kernel_name += "c"
    for dt in output_dtypes:
        kernel_name += "_" + type_string(dt)

    ks = header
    if template_args:
        parts = []
        for n, a in template_args:
            if isinstance(a, (bool, np.bool_)):
                parts.append("bool " + n)
            elif isinstance(a, (int, np.integer)):
                parts.append("int " + n)
            else:
                parts.append("typename " + n)
        ks += "template <" + ", ".join(parts) + ">\n"
    ks += "[[kernel]] void " + kernel_name + "(\n"
    index = 0
    for i, (tstr, ndim, size) in enumerate(in_meta):
        nm = input_names[i]
        loc = "constant" if size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if ndim == 0 else "*"
        ks += f"  const {loc} {tstr}{ref} {nm} [[buffer({index})]],\n"
        index += 1
        if ndim > 0:
            if shape_infos[i][0]:
                ks += f"  const constant int* {nm}_shape [[buffer({index})]],\n"
                index += 1
            if shape_infos[i][1]:
                ks += f"  const constant int64_t* {nm}_strides [[buffer({index})]],\n"
                index += 1
            if shape_infos[i][2]:
                ks += f"  const constant int& {nm}_ndim [[buffer({index})]],\n"
                index += 1
    for i, nm in enumerate(output_names):
        t = type_string(output_dtypes[i])
        if atomic_outputs:
            t = f"atomic<{t}>"
        ks += f"  device {t}* {nm} [[buffer({index})]]"
        # (sic) MLX compares the running buffer index with the input + output count
        if index < len(in_meta) + len(output_names) - 1 or len(attributes) > 0:
            ks += ",\n"
        else:
            ks += ") {\n"
        index += 1
    for j, attr in enumerate(attributes):
        ks += attr
        ks += ",\n" if j < len(attributes) - 1 else ") {\n"
    ks += source
    ks += "\n}\n"
    if template_args:
        tdef = kernel_name + write_template(template_args)
        ks += f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] decltype({tdef}) {tdef};\n'
    return kernel_name, ks
