"""The native kernels (engine/native/) as the extension module mtp_mcp.engine._native; everything else about the
package is in pyproject.toml."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = ["module.c", "pool.c", "gguf_blocks.c", "repack.c", "products_avx2.c", "products_avx512vnni.c",
           "ops_scalar.c", "ops_avx2.c"]


class BuildNative(build_ext):
    """GCC and clang flags: the kernels' results must not depend on the compiler's liberties, so no contraction of
    a * b + c into fused operations the code did not write (-ffp-contract=off) and no fast-math; errno and traps
    are not observed, which lets sqrt and rounding be inlined and loops be vectorised. Each SIMD source chooses its
    instruction set itself (#pragma GCC target), and the module picks one at run time."""

    def build_extensions(self):
        if self.compiler.compiler_type == "unix":
            for extension in self.extensions:
                extension.extra_compile_args = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
                                                "-fvisibility=hidden", "-std=c11", "-Wall"]
                extension.extra_link_args = ["-pthread"]
        super().build_extensions()


setup(
    ext_modules=[Extension("mtp_mcp.engine._native", sources=[f"engine/native/{name}" for name in SOURCES],
                           depends=["engine/native/native.h", "engine/native/blocks.h",
                                    "engine/native/products_x86.h"])],
    cmdclass={"build_ext": BuildNative},
)
