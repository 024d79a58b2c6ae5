"""Keep kernel sources inside the subset that Metal accepts and the emulator models.

g++ accepts C++ that Metal rejects (std::, double, static locals, ...): code
like that would pass every emulator test and fail on a Mac. Conversely some
Metal features are not emulated. `lint` flags both, line by line (comments
stripped); severity "error" must be fixed, "warn" needs a reason to keep.
"""

from __future__ import annotations

import re

_RULES = [
    # Valid C++ but not MSL: would pass the emulator and fail on a Mac.
    ("error", r"\bstd::", "std:: is not available in MSL"),
    ("error", r"\bdouble\b", "MSL has no double"),
    ("error", r"\b(new|delete|malloc|free|throw|try|catch|goto|virtual|typeid|dynamic_cast|"
              r"thread_local)\b", "not allowed in MSL"),
    ("error", r"\bstatic\s+(?!constexpr|constant|const\b)[\w:<>]+\s+\w+\s*[=;\[]",
     "static local variables are not allowed in MSL (use constant / constexpr)"),
    # Metal features the emulator does not model.
    ("error", r"\b(texture[123]d\w*|sampler|imageblock|raytracing|visible_function_table)\b",
     "textures, imageblocks and function tables are not emulated"),
    ("error", r"\b(simdgroup_async_copy|simdgroup_event|cooperative_tensor\w*|tensor_ops)\b",
     "async copies and cooperative tensors are not emulated"),
    ("error", r"\.(?:[xyzw]{2,4}|[rgba]{2,4})\b(?!\s*\()", "vector swizzles are not emulated"),
    # Legal, but results may differ from the emulator's.
    ("warn", r"\bfast::", "fast:: maths is approximate on the GPU; compare with a tolerance"),
    ("warn", r"\bauto\s+\w+\s*=\s*\w+\s*\[",
     "`auto x = buf[i]` on an output binds a tracked reference in the emulator; "
     "prefer an explicit type"),
    ("warn", r"\b(half|float16_t|bfloat16_t|bfloat)\b.*\bsimd_(sum|prefix)",
     "low-precision collectives: the GPU's summation order differs"),
]
_BODY_RULES = [
    ("error", r"#\s*include", "use `header=` for includes and helpers"),
]
_HEADER_RULES = [
    ("error", r"#\s*include(?!\s*<metal_\w+>)",
     "only Metal's own headers (<metal_...>) can be included"),
    ("warn", r"\bdevice\s+[\w:<>]+\s*\*",
     "a helper taking a raw `device T*` bypasses the emulator's bounds and race checks; "
     "make the pointer type a template parameter"),
]


def lint(source: str, header: str = "") -> list[tuple[str, str]]:
    """[(severity, 'where:line: message: code'), ...] for a kernel body and its header."""
    out = []
    for where, text, extra in (("header", header, _HEADER_RULES), ("body", source, _BODY_RULES)):
        for ln, line in enumerate(text.splitlines(), 1):
            code = line.split("//")[0]
            for sev, pat, msg in _RULES + extra:
                if re.search(pat, code):
                    out.append((sev, f"{where}:{ln}: {msg}: {line.strip()[:80]}"))
    return out
