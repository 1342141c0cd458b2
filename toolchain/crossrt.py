"""The TVM runtime for a device, cross-built from the sources the apache-tvm wheel ships.

The wheel carries the runtime's C++ sources (tvm/src/runtime, tvm/include, and tvm_ffi with its
CMakeLists) but binaries for the host only. `ensure_runtime` compiles libtvm_ffi.so and
libtvm_runtime.so with the target's C++ compiler, once per (TVM version, triple, compiler, our
support headers, flags), into a shared cache; `build_runner` links the example runner
(runtime_src/run_model.cc) against them.

The wheel leaves out a few small support headers that these sources include; runtime_src/include
holds our own compatible versions (see the comment at the top of each).
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

LIBS = ("libtvm_ffi.so", "libtvm_runtime.so")
STAMP = "stamp.json"
BUILD_LOG = "build.log"
RUNTIME_SRC = Path(__file__).resolve().parent / "runtime_src"
SUPPORT_INCLUDE = RUNTIME_SRC / "include"

# Bump when the build recipe below changes in a way the flags do not show.
RECIPE = 1
# libtvm_runtime: the *.cc files of src/runtime and of these subfolders (not of their own
# subfolders, which hold the CUDA / Hexagon / minrpc parts). Every one of them builds for a plain
# CPU target; none is dropped. extra/contrib/sort is the CPU sort that topi's sort, argsort and
# topk call ("tvm.contrib.sort.*"), e.g. for ONNX TopK; the rest of extra/ (GPU libraries, NCCL,
# DNNL, NNAPI, TensorRT, disco) is left out.
RUNTIME_DIRS = ("", "vm", "memory", "rpc", "extra/contrib/sort")
# Same bytes for the same inputs: no build date or time in the objects, sorted inputs, and the
# build folder's path mapped away (the -ffile-prefix-map flags are added per build).
COMMON_FLAGS = (
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-DNDEBUG",
    "-Wno-builtin-macro-redefined",
    "-D__DATE__=",
    "-D__TIME__=",
    "-D__TIMESTAMP__=",
)
# As in tvm_ffi's CMakeLists, minus libbacktrace (its sources are not built here).
FFI_FLAGS = ("-DTVM_FFI_USE_LIBBACKTRACE=0", "-DTVM_FFI_BACKTRACE_ON_SEGFAULT=0")
LINK_FLAGS = ("-shared", "-Wl,-z,defs", "-pthread")
PROGRESS_EVERY = 10


class CrossBuildError(RuntimeError):
    """A compile or link step failed; the one-line message names the file and the full log."""


def runtime_cache_root() -> Path:
    """Where built runtimes are cached: $SOCC_CACHE_DIR (or ~/.cache/socc) / runtime."""
    base = os.environ.get("SOCC_CACHE_DIR") or Path.home() / ".cache" / "socc"
    return Path(base) / "runtime"


def runtime_sources() -> tuple[Path, Path]:
    """(tvm package dir, tvm_ffi package dir) of the installed wheels, without importing tvm."""
    dirs = []
    for name in ("tvm", "tvm_ffi"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise CrossBuildError(f"package {name!r} is not installed (pip install apache-tvm)")
        dirs.append(Path(next(iter(spec.submodule_search_locations))))
    return dirs[0], dirs[1]


def ensure_runtime(
    triple: str,
    cxx: Sequence[str],
    *,
    log: Callable[[str], None] = lambda message: None,
    jobs: int | None = None,
) -> Path:
    """A cache directory holding libtvm_ffi.so and libtvm_runtime.so built for `triple` by `cxx`.

    Builds on first use (minutes); later calls only check the stamp's hashes. A lock file keeps
    two processes from building the same entry: the second waits, then reuses the first's result.
    """
    root = runtime_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / f"{_version('apache-tvm')}-{triple}-{_cache_key(triple, cxx)[:12]}"
    if _entry_is_valid(entry):
        return entry
    with _locked(root / f"{entry.name}.lock", log):
        if _entry_is_valid(entry):  # built by another process while we waited
            return entry
        for stale in root.glob(f"{entry.name}.tmp-*"):  # left by failed or killed builds
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{entry.name}.tmp-", dir=root))
        log(f"runtime: building the TVM runtime for {triple} with {' '.join(cxx)} (minutes; once)")
        try:
            _build(tmp, list(cxx), log, jobs or os.cpu_count() or 1)
        finally:
            shutil.rmtree(tmp / "build", ignore_errors=True)  # on failure only build.log stays
        _write_stamp(tmp, triple, cxx)
        tmp.chmod(0o755)  # mkdtemp made it private
        _replace_dir(tmp, entry)
    log(f"runtime: cached in {entry}")
    return entry


def build_runner(runtime_dir: Path, cxx: Sequence[str], output: Path) -> None:
    """Compiles runtime_src/run_model.cc into `output`, to run with runtime/ beside it."""
    _, ffi_dir = runtime_sources()
    cmd = [
        *cxx,
        "-std=c++17",
        "-O2",
        "-Wno-builtin-macro-redefined",
        "-D__DATE__=",
        "-D__TIME__=",
        "-I",
        str(ffi_dir / "include"),
        str(RUNTIME_SRC / "run_model.cc"),
        "-o",
        str(output),
        "-L",
        str(runtime_dir),
        # The runner calls nothing in libtvm_runtime by name, but the model needs it loaded
        # (VM, CPU device API, TVMBackend* symbols): keep it as a dependency anyway.
        "-Wl,--no-as-needed",
        "-ltvm_runtime",
        "-ltvm_ffi",
        "-Wl,-rpath,$ORIGIN/runtime",
        "-pthread",
    ]
    proc = _call(cmd, None)
    if proc.returncode != 0:
        log_path = Path(tempfile.mkdtemp(prefix="socc-runner-")) / BUILD_LOG
        log_path.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        raise _failure(f"building {output.name} from run_model.cc", proc.stderr, log_path)


# ---------------------------------------------------------------- cache entries


def _entry_is_valid(entry: Path) -> bool:
    """True if `entry` has its stamp and both libraries still hash to the stamped SHA-256."""
    try:
        stamp = json.loads((entry / STAMP).read_text())
        return all(_sha256(entry / lib) == stamp["sha256"][lib] for lib in LIBS)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_stamp(folder: Path, triple: str, cxx: Sequence[str]) -> None:
    stamp = {
        "apache-tvm": _version("apache-tvm"),
        "apache-tvm-ffi": _version("apache-tvm-ffi"),
        "triple": triple,
        "cxx": list(cxx),
        "sha256": {lib: _sha256(folder / lib) for lib in LIBS},
    }
    (folder / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")


def _replace_dir(new: Path, entry: Path) -> None:
    """Puts `new` at `entry` with renames; an existing (invalid) entry is moved aside first."""
    old = None
    if entry.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{entry.name}.old-", dir=entry.parent))
        os.rename(entry, old / entry.name)
    os.rename(new, entry)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _locked(path: Path, log: Callable[[str], None]) -> Iterator[None]:
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"runtime: waiting for another process building {path.stem}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cache_key(triple: str, cxx: Sequence[str]) -> str:
    headers = sorted(p for p in SUPPORT_INCLUDE.rglob("*") if p.is_file())
    key = {
        "recipe": RECIPE,
        "apache-tvm": _version("apache-tvm"),
        "apache-tvm-ffi": _version("apache-tvm-ffi"),
        "triple": triple,
        "cxx": list(cxx),
        "flags": [COMMON_FLAGS, FFI_FLAGS, LINK_FLAGS, RUNTIME_DIRS],
        "headers": {str(p.relative_to(SUPPORT_INCLUDE)): _sha256(p) for p in headers},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _version(dist: str) -> str:
    return importlib.metadata.version(dist)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the build


def _build(out: Path, cxx: list[str], log: Callable[[str], None], jobs: int) -> None:
    """Compiles and links both libraries into `out` (working files in out/build)."""
    tvm_dir, ffi_dir = runtime_sources()
    build = out / "build"
    # Copy the sources so that their relative includes ("../../support/x.h") find our headers
    # in tvm/src/support and tvm/3rdparty, and so that the paths the compiler sees are relative.
    shutil.copytree(tvm_dir / "src/runtime", build / "tvm/src/runtime")  # 2 MB
    for d in ("src/support", "3rdparty"):
        shutil.copytree(SUPPORT_INCLUDE / d, build / "tvm" / d)
    shutil.copytree(ffi_dir / "src", build / "tvm_ffi/src")

    site = tvm_dir.parent
    prefix_maps = [f"-ffile-prefix-map={build}/=", f"-ffile-prefix-map={site}/=",
                   f"-ffile-prefix-map={SUPPORT_INCLUDE}/=socc/"]
    ffi_flags = [*COMMON_FLAGS, *FFI_FLAGS, *prefix_maps, "-I", str(ffi_dir / "include")]
    runtime_flags = [
        *COMMON_FLAGS,
        *prefix_maps,
        "-I", str(SUPPORT_INCLUDE),
        "-I", str(SUPPORT_INCLUDE / "3rdparty" / "compiler-rt"),
        "-I", str(tvm_dir / "include"),
        "-I", str(ffi_dir / "include"),
    ]
    ffi_srcs = _ffi_source_list(ffi_dir)
    runtime_srcs = sorted(
        str(p.relative_to(build))
        for d in RUNTIME_DIRS
        for p in (build / "tvm/src/runtime" / d).glob("*.cc")
    )
    units = [(src, ffi_flags) for src in ffi_srcs] + [(src, runtime_flags) for src in runtime_srcs]
    _compile_all(cxx, units, build, out / BUILD_LOG, log, jobs)

    def objects(srcs: list[str]) -> list[str]:
        return [f"obj/{src}.o" for src in srcs]

    _run([*cxx, *LINK_FLAGS, "-Wl,-soname,libtvm_ffi.so", "-o", str(out / "libtvm_ffi.so"),
          *objects(ffi_srcs), "-ldl"], build, out / BUILD_LOG, "linking libtvm_ffi.so")
    _run([*cxx, *LINK_FLAGS, "-Wl,-soname,libtvm_runtime.so", "-o", str(out / "libtvm_runtime.so"),
          *objects(runtime_srcs), "-L", str(out), "-ltvm_ffi", "-Wl,-rpath,$ORIGIN", "-ldl"],
         build, out / BUILD_LOG, "linking libtvm_runtime.so")
    log("runtime: linked " + ", ".join(f"{lib} {(out / lib).stat().st_size / 1e6:.1f} MB"
                                       for lib in LIBS))


def _ffi_source_list(ffi_dir: Path) -> list[str]:
    """The .cc files tvm_ffi's CMakeLists puts in libtvm_ffi (core and "extra" lists)."""
    cmake = (ffi_dir / "CMakeLists.txt").read_text()
    srcs = []
    for block in re.findall(r"set\(\s*_tvm_ffi_(?:extra_)?objs_sources\b(.*?)\)", cmake, re.S):
        srcs += re.findall(r"\$\{CMAKE_CURRENT_SOURCE_DIR\}/(src/\S+?\.cc)", block)
    if not srcs:
        raise CrossBuildError(f"no source list found in {ffi_dir / 'CMakeLists.txt'}")
    return sorted(f"tvm_ffi/{src}" for src in srcs)


def _compile_all(cxx: list[str], units: list[tuple[str, list[str]]], build: Path, log_path: Path,
                 log: Callable[[str], None], jobs: int) -> None:
    """Compiles each (source, flags) to build/obj/<source>.o, `jobs` compilers at a time."""
    for src, _ in units:
        (build / "obj" / src).parent.mkdir(parents=True, exist_ok=True)

    def compile_one(src: str, flags: list[str]) -> subprocess.CompletedProcess[str]:
        return _call([*cxx, *flags, "-c", src, "-o", f"obj/{src}.o"], build)

    with open(log_path, "a") as log_file, \
            concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(compile_one, src, flags): src for src, flags in units}
        done = 0
        for future in concurrent.futures.as_completed(futures):
            proc = future.result()
            log_file.write(f"$ {' '.join(proc.args)}\n{proc.stdout}{proc.stderr}")
            if proc.returncode != 0:
                pool.shutdown(wait=True, cancel_futures=True)
                raise _failure(f"compiling {futures[future]}", proc.stderr, log_path)
            done += 1
            if done % PROGRESS_EVERY == 0 or done == len(units):
                log(f"runtime: compiled {done}/{len(units)}")


def _run(cmd: list[str], cwd: Path | None, log_path: Path, what: str) -> None:
    """Runs one compiler command, appending it and its output to `log_path`."""
    proc = _call(cmd, cwd)
    with open(log_path, "a") as log_file:
        log_file.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        raise _failure(what, proc.stderr, log_path)


def _call(cmd: list[str], cwd: Path | None) -> subprocess.CompletedProcess[str]:
    """Runs `cmd`; a compiler that cannot be started counts as a failed run."""
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except OSError as err:
        return subprocess.CompletedProcess(cmd, 127, "", f"error: cannot run {cmd[0]}: {err}")


def _failure(what: str, stderr: str, log_path: Path) -> CrossBuildError:
    """One line: the step, the compiler's last meaningful stderr lines, and the log's path."""
    lines = [
        line.strip()
        for line in stderr.splitlines()
        if line.strip() and not _NOISE.match(line)
    ]
    detail = " | ".join(lines[-3:]) or "no compiler output"
    return CrossBuildError(f"{what} failed: {detail} (full log: {log_path})")


# Lines that end a compiler's stderr without saying anything: source excerpts ("  34 | code",
# "     |   ^~~"), and the closing remarks of g++ and collect2.
_NOISE = re.compile(
    r"\s*\d*\s*\||compilation terminated|collect2: error: ld returned"
    r"|clang\S*: error: linker command failed"
)
