"""sagfast's package layout and its optional C++/CUDA extension (the metadata is in pyproject.toml).

Install with the project's constraints file (torch 2.13.0, triton 3.7.1), without build isolation:
    pip install -c constraints.txt --no-build-isolation -e ".[test]"
"""

import os
import shutil
import sys

from setuptools import find_packages, setup


def _cpp_extension():
    """(ext_modules, cmdclass) for the C++ ops in csrc/, or ([], {}) when they are not built.

    Built when torch and a C++ compiler are importable/present at build time, unless
    SAGFAST_BUILD_EXT=0. CUDA kernels are added only when torch is a CUDA build and a CUDA toolkit is
    found (SAGFAST_BUILD_CUDA=0 switches them off). Build without isolation (pip's
    --no-build-isolation), or pip would fetch a CUDA torch into an isolated build environment.
    The package works without the extension (the "cpp" backend then reports why it cannot run).
    """
    if os.environ.get("SAGFAST_BUILD_EXT", "1") == "0":
        # An extension built before would still load (and `sagfast info` say so): remove it.
        here = os.path.dirname(os.path.abspath(__file__))
        for name in os.listdir(os.path.join(here, "sagfast")):
            if name.startswith("_C") and name.endswith((".so", ".pyd")):
                os.remove(os.path.join(here, "sagfast", name))
                print(f"sagfast: SAGFAST_BUILD_EXT=0: removed the extension built before (sagfast/{name})", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("sagfast: torch is not importable at build time: building without the C++ ops", file=sys.stderr)
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("sagfast: no C++ compiler found: building without the C++ ops", file=sys.stderr)
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = ["csrc/sagfast_ops.cpp"]
    # at::parallel_for is an OpenMP loop in torch's Linux builds: without -fopenmp it runs on one thread.
    # (The library then needs libgomp.so.1, which torch itself loads first.)
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    flags = {"cxx": ["-O3", *openmp]}
    cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("SAGFAST_BUILD_CUDA", "1") != "0"
    if cuda:
        sources.append("csrc/sagfast_cuda.cu")
        flags["nvcc"] = ["-O3", "-lineinfo"]
        ext = CUDAExtension(
            "sagfast._C", sources, extra_compile_args=flags, extra_link_args=openmp, include_dirs=[os.path.join(here, "csrc")]
        )
    else:
        ext = CppExtension(
            "sagfast._C", sources, extra_compile_args=flags, extra_link_args=openmp, include_dirs=[os.path.join(here, "csrc")]
        )
    return [ext], {"build_ext": BuildExtension}


_EXT_MODULES, _CMDCLASS = _cpp_extension()

# The metadata is in pyproject.toml; this file adds the package layout and the extension.
setup(
    packages=find_packages(include=["sagfast", "sagfast.*"]) + ["sagfast.kernels"],
    # kernels/ holds Triton code only and is installed as sagfast.kernels: a top-level `kernels`
    # package would clash with the PyPI project of that name (and diffusers' use of it).
    package_dir={"sagfast.kernels": "kernels"},
    ext_modules=_EXT_MODULES,
    cmdclass=_CMDCLASS,
)
