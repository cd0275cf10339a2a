"""Build fluxion._C: the CPU sources always, the CUDA sources when FLUXION_CUDA resolves on.

FLUXION_CUDA=auto (default): on when torch is a CUDA build *and* a CUDA toolkit is found (never decided by
torch.cuda.is_available(), which is False on a GPU-less build box). FLUXION_CUDA=1 fails loudly when it
cannot build CUDA; FLUXION_CUDA=0 builds the CPU part only. TORCH_CUDA_ARCH_LIST defaults to 9.0 (Hopper).
FLUXION_NATIVE=1 adds -march=native (opt-in; the default binary dispatches SIMD at run time).
Install with `pip install --no-build-isolation -e .` so the build uses the torch already installed.
"""

import glob
import json
import os
import subprocess

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("FLUXION_CUDA", "auto").strip().lower()
    have_toolkit = cpp_extension.CUDA_HOME is not None
    have_torch_cuda = torch.version.cuda is not None
    if mode in ("0", "off", "false", "no"):
        return False
    if mode in ("1", "on", "true", "yes"):
        if not have_torch_cuda:
            raise RuntimeError(f"FLUXION_CUDA=1 but torch {torch.__version__} is not a CUDA build")
        if not have_toolkit:
            raise RuntimeError("FLUXION_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True
    if mode != "auto":
        raise RuntimeError(f"FLUXION_CUDA must be auto, 1 or 0, got {mode!r}")
    return have_torch_cuda and have_toolkit


def _git_sha() -> str:
    """$FLUXION_GIT_SHA when set (copies of the tree whose .git is missing or stale), else git's HEAD."""
    if os.environ.get("FLUXION_GIT_SHA"):
        return os.environ["FLUXION_GIT_SHA"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


with_cuda = _want_cuda()
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

sources = _sources("csrc/core/**/*.cpp") + _sources("csrc/ops/*.cpp")
# -fopenmp: at::parallel_for is a header template compiled into this library; without OpenMP its
# `#pragma omp parallel` is dropped and every "parallel" loop runs on one thread.
cxx_flags = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fopenmp", "-DFLUXION_BUILD_TORCH_OPS"]
if os.environ.get("FLUXION_NATIVE") == "1":
    cxx_flags.append("-march=native")
nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
define_macros = []
if with_cuda:
    sources += _sources("csrc/core/cuda/*.cu") + _sources("csrc/ops/*.cu")
    cxx_flags.append("-DFLUXION_WITH_CUDA")
    nvcc_flags.append("-DFLUXION_WITH_CUDA")

# Build info recorded at build time, read by `python -m fluxion info`.
build_info = {
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "with_cuda": with_cuda,
    "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
    "git_sha": _git_sha(),
    "native": os.environ.get("FLUXION_NATIVE") == "1",
}
with open(os.path.join(ROOT, "fluxion", "_build_info.json"), "w") as f:
    json.dump(build_info, f, indent=1)

Extension = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
ext = Extension(
    name="fluxion._C",
    sources=sources,
    include_dirs=[os.path.join(ROOT, "csrc")],
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    define_macros=define_macros,
    extra_link_args=["-fopenmp"],
    py_limited_api=False,
)

setup(
    name="fluxion",
    packages=find_packages(include=["fluxion", "fluxion.*"]),
    package_data={"fluxion": ["_build_info.json"]},
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
