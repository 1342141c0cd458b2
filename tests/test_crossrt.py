"""The cross-built TVM runtime and runner: real aarch64 builds run under qemu, plus cheap checks of
the cache (stamp, self-heal, lock) and of the error messages.

The first run builds the runtime into the shared cache (about 5 minutes on 2 cores); later runs
reuse it.
"""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from toolchain import crossrt

TRIPLE = "aarch64-linux-gnu"
CXX = ["aarch64-linux-gnu-g++"]
QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]

needs_cross = pytest.mark.skipif(
    shutil.which(CXX[0]) is None or shutil.which(QEMU[0]) is None,
    reason="needs aarch64-linux-gnu-g++ and qemu-aarch64",
)


# ---------------------------------------------------------------- real builds, run under qemu


def _export(mod, path: Path) -> None:
    import tvm
    from tvm.support import cc

    target = tvm.target.Target({"kind": "llvm", "mtriple": TRIPLE, "mattr": ["+neon"]})
    tvm.compile(mod, target=target).export_library(str(path), fcompile=cc.cross_compiler(CXX[0]))


def _models(folder: Path) -> None:
    """dense.so: relu(x @ w + 0.5). tuple.so: (a * 2, (n + 7, a)) with n an int64 vector.
    parallel.so: x * 3 + 1 by a kernel with a parallel loop (runs on TVM's thread pool).
    topk.so: the 3 largest of each row and their indices (calls tvm.contrib.sort.topk)."""
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    @I.ir_module
    class Dense:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 16), "float32")):
            with R.dataflow():
                y = R.nn.relu(R.add(R.matmul(x, w), R.const(0.5, "float32")))
                R.output(y)
            return y

    @I.ir_module
    class Nested:
        @R.function
        def main(a: R.Tensor((3, 5), "float32"), n: R.Tensor((3,), "int64")):
            with R.dataflow():
                doubled = R.multiply(a, R.const(2.0, "float32"))
                shifted = R.add(n, R.const(7, "int64"))
                out = (doubled, (shifted, a))
                R.output(out)
            return out

    @I.ir_module
    class Parallel:
        @T.prim_func
        def scale(x: T.Buffer((64, 32), "float32"), y: T.Buffer((64, 32), "float32")):
            for i in T.parallel(64):
                for j in range(32):
                    y[i, j] = x[i, j] * T.float32(3) + T.float32(1)

        @R.function
        def main(x: R.Tensor((64, 32), "float32")):
            cls = Parallel
            return R.call_tir(cls.scale, (x,), out_ty=R.Tensor((64, 32), "float32"))

    @I.ir_module
    class TopK:
        @R.function
        def main(x: R.Tensor((4, 10), "float32")):
            with R.dataflow():
                out = R.topk(x, k=3, axis=-1, ret_type="both", largest=True, dtype="int64")
                R.output(out)
            return out

    _export(Dense, folder / "dense.so")
    _export(Nested, folder / "tuple.so")
    _export(Parallel, folder / "parallel.so")
    _export(TopK, folder / "topk.so")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like a socc artifact: run_model, runtime/, and the two models."""
    folder = tmp_path_factory.mktemp("artifact")
    runtime_dir = crossrt.ensure_runtime(TRIPLE, CXX, log=print)
    (folder / "runtime").mkdir()
    for lib in crossrt.LIBS:
        shutil.copyfile(runtime_dir / lib, folder / "runtime" / lib)
    crossrt.build_runner(runtime_dir, CXX, folder / "run_model")
    _models(folder)
    return folder


def _run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QEMU, "./run_model", *args], cwd=folder, capture_output=True,
                          text=True, timeout=300)


@needs_cross
def test_dense_matches_numpy(artifact: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8)).astype("float32")
    w = rng.standard_normal((8, 16)).astype("float32")
    np.save(artifact / "x.npy", x)
    np.save(artifact / "w.npy", w)
    (artifact / "out_dense").mkdir()

    proc = _run(artifact, "dense.so", "out_dense", "x.npy", "w.npy", "--repeat", "3")

    assert proc.returncode == 0, proc.stderr
    fields = proc.stdout.split()
    assert fields[0] == "timing_ms" and fields[3] == "runs=3", proc.stdout
    assert float(fields[2].split("=")[1]) <= float(fields[1].split("=")[1])  # min <= median
    assert sorted(p.name for p in (artifact / "out_dense").iterdir()) == ["out_0.npy"]
    out = np.load(artifact / "out_dense" / "out_0.npy")
    assert out.dtype == np.float32 and out.shape == (4, 16)
    np.testing.assert_allclose(out, np.maximum(x @ w + 0.5, 0), rtol=1e-5, atol=1e-6)


@needs_cross
def test_nested_tuple_and_int64_round_trip(artifact: Path) -> None:
    a = np.arange(15, dtype="float32").reshape(3, 5) / 7
    n = np.array([-(2**40), 0, 2**62], dtype="int64")  # beyond int32 and float64 precision
    np.save(artifact / "a.npy", a)
    np.save(artifact / "n.npy", n)
    (artifact / "out_tuple").mkdir()

    proc = _run(artifact, "tuple.so", "out_tuple", "a.npy", "n.npy")

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # no timing line without --repeat
    outs = [np.load(artifact / "out_tuple" / f"out_{k}.npy") for k in range(3)]
    assert not (artifact / "out_tuple" / "out_3.npy").exists()
    np.testing.assert_allclose(outs[0], a * 2, rtol=1e-5)
    assert outs[1].dtype == np.int64 and outs[1].tolist() == (n + 7).tolist()
    assert outs[2].dtype == np.float32 and np.array_equal(outs[2], a)


@needs_cross
def test_parallel_kernel_on_two_threads(artifact: Path) -> None:
    x = np.random.default_rng(1).standard_normal((64, 32)).astype("float32")
    np.save(artifact / "px.npy", x)

    proc = _run(artifact, "parallel.so", "out_parallel", "px.npy", "--threads", "2",
                "--repeat", "2")

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("timing_ms median=") and proc.stdout.endswith(" runs=2\n")
    out = np.load(artifact / "out_parallel" / "out_0.npy")  # the runner made the folder
    np.testing.assert_allclose(out, x * 3 + 1, rtol=1e-5, atol=1e-6)


@needs_cross
def test_topk_uses_the_contrib_sort(artifact: Path) -> None:
    x = np.random.default_rng(2).permutation(40).reshape(4, 10).astype("float32")  # no ties
    np.save(artifact / "kx.npy", x)

    proc = _run(artifact, "topk.so", "out_topk", "kx.npy")

    assert proc.returncode == 0, proc.stderr
    values, indices = (np.load(artifact / "out_topk" / f"out_{k}.npy") for k in range(2))
    expected = np.argsort(-x, axis=-1)[:, :3]
    assert indices.dtype == np.int64 and indices.tolist() == expected.tolist()
    assert np.array_equal(values, np.take_along_axis(x, expected, axis=-1))


@needs_cross
def test_runner_errors_are_one_line(artifact: Path) -> None:
    cases = [
        ("dense.so", "out_err", "missing.npy", "w.npy"),  # no such input
        ("nothere.so", "out_err"),  # no such model
        ("dense.so",),  # usage
        ("dense.so", "out_err", "x.npy", "w.npy", "--repeat", "many"),
        ("dense.so", "out_err", "x.npy", "w.npy", "--threads", "0"),
        ("dense.so", "out_err", "x.npy"),  # too few inputs for main
    ]
    for args in cases:
        proc = _run(artifact, *args)
        assert proc.returncode == 1, (args, proc.stderr)
        assert proc.stderr.startswith("run_model: "), proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr


@needs_cross
def test_cached_entry_is_reused_quickly() -> None:
    start = time.perf_counter()
    entry = crossrt.ensure_runtime(TRIPLE, CXX)
    assert time.perf_counter() - start < 5
    assert crossrt._entry_is_valid(entry)
    assert entry.parent == crossrt.runtime_cache_root()
    assert entry.name.startswith(f"0.27.0.post1-{TRIPLE}-")


# ---------------------------------------------------------------- cache logic, without compiling


def _fake_libs(folder: Path) -> None:
    for lib in crossrt.LIBS:
        (folder / lib).write_bytes(lib.encode() * 1000)


def test_entry_is_valid_detects_corruption(tmp_path: Path) -> None:
    _fake_libs(tmp_path)
    crossrt._write_stamp(tmp_path, TRIPLE, CXX)
    assert crossrt._entry_is_valid(tmp_path)

    data = (tmp_path / "libtvm_runtime.so").read_bytes()
    (tmp_path / "libtvm_runtime.so").write_bytes(data[: len(data) // 2])  # truncated
    assert not crossrt._entry_is_valid(tmp_path)

    (tmp_path / "libtvm_runtime.so").write_bytes(data)
    assert crossrt._entry_is_valid(tmp_path)
    (tmp_path / crossrt.STAMP).write_text("{")  # damaged stamp
    assert not crossrt._entry_is_valid(tmp_path)
    (tmp_path / crossrt.STAMP).unlink()
    assert not crossrt._entry_is_valid(tmp_path)
    assert not crossrt._entry_is_valid(tmp_path / "no-such-entry")


@pytest.fixture
def fake_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """A private cache whose builds only write dummy libraries (slowly); returns the build dirs."""
    monkeypatch.setenv("SOCC_CACHE_DIR", str(tmp_path / "cache"))
    builds: list[Path] = []

    def build(out: Path, cxx: list[str], log, jobs: int) -> None:
        builds.append(out)
        time.sleep(0.3)
        _fake_libs(out)

    monkeypatch.setattr(crossrt, "_build", build)
    return builds


def test_invalid_entry_is_rebuilt(fake_build: list[Path]) -> None:
    entry = crossrt.ensure_runtime(TRIPLE, CXX)
    assert len(fake_build) == 1 and crossrt._entry_is_valid(entry)
    assert crossrt.ensure_runtime(TRIPLE, CXX) == entry and len(fake_build) == 1  # reused

    with open(entry / "libtvm_ffi.so", "r+b") as handle:
        handle.truncate(10)
    assert crossrt.ensure_runtime(TRIPLE, CXX) == entry and len(fake_build) == 2  # healed
    assert crossrt._entry_is_valid(entry)
    # Only the entry and its lock file are left: no temp or moved-aside folders.
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name, entry.name + ".lock"]


def test_concurrent_callers_build_once(fake_build: list[Path]) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(crossrt.ensure_runtime(TRIPLE, CXX)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake_build) == 1
    assert len(set(results)) == 1 and len(results) == 3


def test_cache_key_follows_compiler_and_headers(fake_build: list[Path]) -> None:
    a = crossrt.ensure_runtime(TRIPLE, CXX)
    b = crossrt.ensure_runtime(TRIPLE, [*CXX, "-mcpu=cortex-a55"])
    assert a != b and len(fake_build) == 2
    assert a.name.split("-")[-1] != b.name.split("-")[-1]


def test_ffi_sources_come_from_its_cmakelists() -> None:
    _, ffi_dir = crossrt.runtime_sources()
    srcs = crossrt._ffi_source_list(ffi_dir)
    assert "tvm_ffi/src/ffi/object.cc" in srcs and "tvm_ffi/src/ffi/extra/module.cc" in srcs
    assert not any("testing" in src for src in srcs)
    assert srcs == sorted(srcs) and all((ffi_dir.parent / src).is_file() for src in srcs)


def test_compiler_failure_names_file_and_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the failure log goes
    # A stand-in compiler that fails like g++ does.
    fake_cxx = [sys.executable, "-c",
                "import sys; sys.stderr.write('run_model.cc:3:1: error: boom\\n"
                "compilation terminated.\\n'); sys.exit(1)"]
    with pytest.raises(crossrt.CrossBuildError) as info:
        crossrt.build_runner(tmp_path, fake_cxx, tmp_path / "run_model")
    message = str(info.value)
    assert "\n" not in message
    assert "run_model.cc" in message and "error: boom" in message
    assert "compilation terminated" not in message  # g++'s closing remark says nothing
    log = Path(message.rsplit("(full log: ", 1)[1].rstrip(")"))
    assert log.is_relative_to(tmp_path) and "error: boom" in log.read_text()


def test_missing_compiler_is_a_cross_build_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(crossrt.CrossBuildError, match="cannot run no-such-compiler-g"):
        crossrt.build_runner(tmp_path, ["no-such-compiler-g++"], tmp_path / "run_model")


def test_compile_failure_names_the_source(tmp_path: Path) -> None:
    fail_on_b = [sys.executable, "-c",
                 "import sys; 'b.cc' in sys.argv and sys.exit('b.cc:1:1: error: bad')"]
    units = [("a.cc", ["-DX"]), ("b.cc", ["-DX"]), ("c.cc", ["-DX"])]
    with pytest.raises(crossrt.CrossBuildError) as info:
        crossrt._compile_all(fail_on_b, units, tmp_path, tmp_path / "build.log", print, 2)
    message = str(info.value)
    assert message.startswith("compiling b.cc failed: b.cc:1:1: error: bad (full log: ")
    assert "b.cc:1:1: error: bad" in (tmp_path / "build.log").read_text()


# ---------------------------------------------------------------- our support headers, on the host

# Exercises the headers in runtime_src/include (built with the host compiler, linked with the
# wheel's host libtvm_ffi) and prints results for the test below to check against Python.
HEADER_CHECK = r"""
#include <builtin_fp16.h>
#include <tvm/support/serializer.h>

#include <cstdio>
#include <deque>

#include "src/support/arena.h"
#include "src/support/base64.h"
#include "src/support/bytes_io.h"
#include "src/support/ring_buffer.h"
#include "src/support/utils.h"

using namespace tvm;

int main() {
  // Serializer: one of each kind, printed as hex, then read back.
  std::string bytes;
  support::BytesOutStream out(&bytes);
  out.Write(std::vector<std::string>{"ab", ""});
  out.Write(std::vector<int32_t>{1, -2});
  out.Write(DLDataType{kDLFloat, 16, 4});
  out.Write(DLDevice{kDLCPU, 3});
  out.Write(ffi::Array<ffi::String>{"xyz"});
  std::printf("ser|");
  for (unsigned char c : bytes) std::printf("%02x", c);
  support::BytesInStream in(bytes);
  std::vector<std::string> s;
  std::vector<int32_t> v;
  DLDataType t;
  DLDevice d;
  ffi::Array<ffi::String> a;
  bool ok = in.Read(&s) && in.Read(&v) && in.Read(&t) && in.Read(&d) && in.Read(&a);
  ok = ok && s.size() == 2 && s[0] == "ab" && v[1] == -2 && t.lanes == 4 && d.device_id == 3 &&
       a.size() == 1 && a[0] == "xyz" && !in.Read(&v);  // and nothing left
  std::printf("|%d\n", ok);

  // Base64 of 0..5 bytes, and back.
  for (size_t n = 0; n <= 5; ++n) {
    std::string text;
    support::BytesOutStream text_out(&text);
    support::Base64OutStream enc(&text_out);
    enc.Write("socc!", n);
    enc.Finish();
    support::BytesInStream text_in(text);
    support::Base64InStream dec(&text_in);
    dec.InitPosition();
    std::string back(8, '?');
    size_t got = dec.Read(&back[0], back.size());
    bool same = got == n && back.substr(0, n) == std::string("socc!", n);
    std::printf("b64|%s|%d\n", text.c_str(), same);
  }

  // Ring buffer against a plain queue: wrap-around, growth, partial callbacks.
  support::RingBuffer ring;
  std::deque<char> model;
  unsigned seed = 1;
  auto rnd = [&](unsigned m) { seed = seed * 1103515245 + 12345; return (seed >> 8) % m; };
  bool ring_ok = true;
  for (int step = 0; step < 20000; ++step) {
    size_t n = rnd(3000);
    switch (rnd(4)) {
      case 0: {
        std::string chunk(n, '\0');
        for (char& c : chunk) c = static_cast<char>(rnd(256));
        ring.Write(chunk.data(), n);
        model.insert(model.end(), chunk.begin(), chunk.end());
        break;
      }
      case 1: {
        n = std::min(n, model.size());
        std::string got(n, '\0');
        ring.Read(&got[0], n);
        ring_ok &= std::equal(got.begin(), got.end(), model.begin());
        model.erase(model.begin(), model.begin() + n);
        break;
      }
      case 2:
        ring.ReadWithCallback([&](const void* data, size_t size) {
          size_t take = size / 2 + 1;
          const char* p = static_cast<const char*>(data);
          ring_ok &= std::equal(p, p + take, model.begin());
          model.erase(model.begin(), model.begin() + take);
          return take;
        }, n);
        break;
      default:
        ring.WriteWithCallback([&](void* p, size_t size) {
          size_t put = size - size / 3;
          for (size_t i = 0; i < put; ++i) static_cast<char*>(p)[i] = static_cast<char>(rnd(256));
          model.insert(model.end(), static_cast<char*>(p), static_cast<char*>(p) + put);
          return put;
        }, n);
    }
    ring_ok &= ring.bytes_available() == model.size();
  }
  std::printf("ring|%d\n", ring_ok);

  // Arena: aligned, separate, reusable after RecycleAll.
  support::Arena arena;
  bool arena_ok = true;
  for (int round = 0; round < 3; ++round) {
    std::vector<std::pair<double*, int>> blocks;
    for (int i = 1; i < 400; i += 7) {
      double* p = arena.allocate_<double>(i);
      arena_ok &= reinterpret_cast<uintptr_t>(p) % alignof(double) == 0;
      for (int k = 0; k < i; ++k) p[k] = i;
      blocks.push_back({p, i});
    }
    for (auto& [p, i] : blocks) {
      for (int k = 0; k < i; ++k) arena_ok &= p[k] == i;
    }
    arena.RecycleAll();
  }
  std::printf("arena|%d\n", arena_ok);

  // fp16 conversions: float -> half bits, and half bits -> float.
  const float values[] = {1.0f, -2.5f, 65504.0f, 65520.0f, 1e-8f, 6e-8f, 3.0e-5f, 0.1f, -0.0f};
  std::printf("f2h|");
  for (float f : values) {
    std::printf("%04x ", __truncXfYf2__<float, uint32_t, 23, uint16_t, uint16_t, 10>(f));
  }
  std::printf("\nh2f|");
  for (uint16_t h : {0x0001, 0x03ff, 0x3555, 0xfbff, 0x7c00}) {
    std::printf("%.9g ", __extendXfYf2__<uint16_t, uint16_t, 10, float, uint32_t, 23>(h));
  }
  std::printf("\nutils|%d%d%d%d\n", support::IsNumber("042"), support::IsNumber("4a"),
              support::StartsWith("RPCSessionTimeoutError: x", "RPCSessionTimeoutError: "),
              support::StartsWith("ab", "abc"));
}
"""


def test_support_headers_behave(tmp_path: Path) -> None:
    if shutil.which("g++") is None:
        pytest.skip("needs a host g++")
    _, ffi_dir = crossrt.runtime_sources()
    include = crossrt.SUPPORT_INCLUDE
    (tmp_path / "check.cc").write_text(HEADER_CHECK)
    subprocess.run(
        ["g++", "-std=c++17", "-O1", "-I", str(include),
         "-I", str(include / "3rdparty/compiler-rt"), "-I", str(ffi_dir / "include"),
         "check.cc", "-o", "check",
         "-L", str(ffi_dir / "lib"), "-ltvm_ffi", f"-Wl,-rpath,{ffi_dir / 'lib'}"],
        cwd=tmp_path, check=True,
    )
    lines = subprocess.run([str(tmp_path / "check")], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    results: dict[str, list[list[str]]] = {}
    for line in lines:
        name, *fields = line.split("|")
        results.setdefault(name, []).append(fields)

    # The byte layout TVM's serializer uses: uint64 counts and sizes, little-endian numbers.
    expected = (
        struct.pack("<QQ2sQ", 2, 2, b"ab", 0)  # vector<string>{"ab", ""}
        + struct.pack("<Qii", 2, 1, -2)  # vector<int32_t>{1, -2}
        + struct.pack("<BBH", 2, 16, 4)  # DLDataType float16x4
        + struct.pack("<ii", 1, 3)  # DLDevice cpu:3
        + struct.pack("<QQ3s", 1, 3, b"xyz")  # Array<String>{"xyz"}
    )
    assert results["ser"] == [[expected.hex(), "1"]]
    assert results["b64"] == [[base64.b64encode(b"socc!"[:n]).decode(), "1"] for n in range(6)]
    assert results["ring"] == [["1"]] and results["arena"] == [["1"]]

    values = np.array([1.0, -2.5, 65504.0, 65520.0, 1e-8, 6e-8, 3.0e-5, 0.1, -0.0], "float32")
    with np.errstate(over="ignore"):  # 65520 rounds to infinity in float16
        halves = values.astype("float16").view("uint16")
    assert results["f2h"][0][0].split() == [f"{h:04x}" for h in halves]
    bits = np.array([0x0001, 0x03FF, 0x3555, 0xFBFF, 0x7C00], "uint16")
    floats = bits.view("float16").astype("float32").tolist()
    assert [np.float32(x) for x in results["h2f"][0][0].split()] == floats
    assert results["utils"] == [["1010"]]
