"""Run a benchmark script with another checkout's blitzdiff: its Python code and, once built there, its own C++ kernels
(blitzdiff._C), for before / after measurements of kernel changes.

    git worktree add /tmp/before <revision>
    python benchmarks/in_checkout.py CHECKOUT [--build] [SCRIPT [ARGS ...]]
    python benchmarks/in_checkout.py /tmp/before --build          # blitzdiff._C into /tmp/before/blitzdiff/
    python benchmarks/in_checkout.py /tmp/before benchmarks/bench_scheduler_overhead.py --threads 2 --json old.json

--build configures and builds the checkout's CMake project (CPU kernels only, BLITZDIFF_CUDA=OFF, Release: the flags
of CMakeLists.txt, as a pip install builds them) in CHECKOUT/build-bench and copies the module into the checkout's
package, where this script and benchmarks/ab_checkouts.py pick it up; it needs cmake and pybind11 (`pip install
pybind11`). A checkout without a built module uses the installed one, as ab_checkouts does: for Python changes only.
The script path is relative to the checkout and runs as __main__ with the remaining arguments; the checkout's own
benchmarks/ folder comes first on sys.path.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path


def build(checkout: Path) -> Path:
    """Build blitzdiff._C for `checkout` and copy it into checkout/blitzdiff/; returns the copy's path."""
    try:
        import pybind11
    except ImportError as error:
        raise SystemExit("--build needs pybind11 (pip install pybind11)") from error
    folder = checkout / "build-bench"
    subprocess.run(["cmake", "-S", str(checkout), "-B", str(folder), "-DBLITZDIFF_CUDA=OFF",
                    "-DCMAKE_BUILD_TYPE=Release", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                    f"-DPython_EXECUTABLE={sys.executable}"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(folder), "-j", str(os.cpu_count() or 1)], check=True,
                   stdout=subprocess.DEVNULL)
    (module,) = folder.glob("_C*.so")
    return Path(shutil.copy2(module, checkout / "blitzdiff" / module.name))


def installed_extension() -> str | None:
    """The installed blitzdiff._C's path, found in a child process: finding it here would import the installed
    blitzdiff, whose torch.library ops the checkout's could then not register again."""
    code = "import importlib.util as u; s = u.find_spec('blitzdiff._C'); print(s.origin if s else '')"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return found or None


def use(checkout: Path, installed: str | None) -> None:
    """Import blitzdiff from `checkout` (bypassing an editable install's import hook), with the checkout's own
    blitzdiff._C where one is built there, else the module at `installed` (installed_extension(); None: none).
    benchmarks/ab_checkouts.py's processes import their checkout through this too."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in type(finder).__module__]
    sys.path.insert(0, str(checkout))
    import blitzdiff

    if not blitzdiff.__file__.startswith(str(checkout)):
        raise SystemExit(f"blitzdiff was imported from {blitzdiff.__file__}, not from {checkout}")
    if importlib.util.find_spec("blitzdiff._C") is None and installed is not None:
        spec = importlib.util.spec_from_file_location("blitzdiff._C", installed)
        sys.modules["blitzdiff._C"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


def main() -> None:
    # by hand rather than argparse: everything after the script path is the script's own, options included
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(__doc__)
    checkout, rest = Path(argv[0]).resolve(), argv[1:]
    if rest[:1] == ["--build"]:
        print(f"built {build(checkout)}", flush=True)
        rest = rest[1:]
    if not rest:
        return
    sys.path.insert(0, str(checkout / "benchmarks"))  # the script's own helpers (_timing, ...)
    use(checkout, installed_extension())
    extension = importlib.import_module("blitzdiff._C")
    print(f"blitzdiff from {checkout}, blitzdiff._C from {extension.__file__}", flush=True)
    sys.argv = [str(checkout / rest[0]), *rest[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
