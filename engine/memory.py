"""Giving freed memory back to the operating system.

glibc's allocator keeps freed blocks of up to 32 MB (its mmap threshold grows with the sizes freed) for reuse instead
of returning them, so the float32 chunks a GGUF is dequantized through (the float reference, or a format the kernels do
not compute) stay in the resident set after they are freed: measured on the embedded model dequantized per row to int8
as earlier versions loaded it, 1.65 GB resident after the first generation, 1.13 GB after malloc_trim(0). Called after
loading; a no-op where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def release_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
