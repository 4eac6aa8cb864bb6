"""Builds fxreduce's native kernels (fxreduce._C) ahead of time; the package metadata is in pyproject.toml.

Install after torch with ``pip install --no-build-isolation -e .`` (./dev does it). Each kernel file
is compiled for its own ISA (the -m flags below) and the library picks one at load from the CPU. Without
a C++ compiler, or when torch's headers are missing, the package installs without the extension and
every op runs on its torch reference (fxreduce.native says so once). FXREDUCE_REQUIRE_NATIVE=1 (CI)
turns a failed build into an error.
"""

import hashlib
import os
import platform
import sys

from setuptools import setup

X86 = platform.machine().lower() in ("x86_64", "amd64")
ISA_FLAGS = {
    "kernels_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"],
    "kernels_avx2.cpp": ["-mavx2", "-mfma"],
    "sparse_int8_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-ffp-contract=off"],
    "sparse_int8_avx2.cpp": ["-mavx2", "-ffp-contract=off"],
    "lowrank_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"],
    "lowrank_avx2.cpp": ["-mavx2", "-mfma"],
} if X86 else {}
# The sparse int8 kernels round x * inverse_scale before rounding to an integer, as torch's quantizer does.
FILE_FLAGS = {**ISA_FLAGS, "sparse_int8_portable.cpp": ["-ffp-contract=off"]}
COMMON_FLAGS = ["-O3", "-Wno-psabi"]
REQUIRE = os.environ.get("FXREDUCE_REQUIRE_NATIVE") == "1"
CSRC = os.path.join("fxreduce", "csrc")


def sources_digest() -> str:
    """A digest of the kernel sources, compiled in: a latency profile measured on other kernels is refused."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(CSRC)):
        digest.update(name.encode() + b"\0")
        with open(os.path.join(CSRC, name), "rb") as source:
            digest.update(source.read())
    return digest.hexdigest()[:12]


def extension_setup() -> dict:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        if REQUIRE:
            raise
        print("fxreduce: torch is not importable, building without native kernels", file=sys.stderr)
        return {}

    class PerFileFlags(BuildExtension):
        """BuildExtension compiling each kernel file with its own ISA flags; a failed build is a warning
        (the torch fallback serves) unless FXREDUCE_REQUIRE_NATIVE=1."""

        def build_extension(self, ext):
            compile_one = self.compiler._compile

            def with_isa_flags(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                flags = FILE_FLAGS.get(os.path.basename(src), [])
                return compile_one(obj, src, ext_, cc_args, list(extra_postargs) + flags, pp_opts)

            self.compiler._compile = with_isa_flags
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 - any compiler failure means: no native layer
                if REQUIRE:
                    raise
                print(f"fxreduce: the native kernels did not build ({error}); the torch fallback will serve",
                      file=sys.stderr)
            finally:
                self.compiler._compile = compile_one

    sources = ["ops.cpp", "kernels_portable.cpp", "sparse_int8_ops.cpp", "sparse_int8_portable.cpp", "lowrank_ops.cpp",
               "lowrank_portable.cpp", *ISA_FLAGS]
    extension = CppExtension(
        "fxreduce._C",
        [os.path.join(CSRC, name) for name in sources],
        # A changed header rebuilds the extension.
        depends=[os.path.join(CSRC, name) for name in os.listdir(CSRC) if name.endswith(".h")],
        define_macros=[("FXR_SOURCES_DIGEST", f'"{sources_digest()}"')],
        extra_compile_args=COMMON_FLAGS + ["-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": PerFileFlags.with_options(use_ninja=False)}}


setup(**extension_setup())
