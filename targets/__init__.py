"""Target profiles: one TOML file per SoC unit or family, loaded into `TargetProfile` data.

A profile says what the build needs to know about a chip (triple, cpu, features, vector width,
toolchain commands, supported ops); the few facts data cannot say live in `TargetProfile` methods.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
from pathlib import Path
from typing import Any

from toolchain.errors import UserError

PROFILE_DIR = Path(__file__).resolve().parent

# Feature names as people write them -> LLVM AArch64 subtarget attributes.
_LLVM_FEATURE_NAMES = {"fp16": "fullfp16"}


REQUANTIZE_MODES = ("float", "integer")  # how int8 layers requantize (TargetProfile.requantize)
LAYOUTS = ("NCHW", "NHWC")  # the convolutions' layout (TargetProfile.layout)

@dataclasses.dataclass(frozen=True)
class TargetProfile:
    """A resolved target profile (every field filled, `extends` applied)."""

    name: str
    family: str
    description: str
    triple: str
    cpu: str
    arch: str
    features: tuple[str, ...] = ()
    vector_bits: int = 0
    cxx: tuple[str, ...] = ()
    emulator: tuple[str, ...] = ()
    android_triple: str = ""
    supported_ops: tuple[str, ...] = ()  # empty: every op the ONNX importer converts
    default_passes: tuple[str, ...] = ()  # empty: the pipeline's standard list
    # LLVM features switched off (e.g. HVX floating point, which qemu-hexagon cannot execute).
    disabled_features: tuple[str, ...] = ()
    llvm_opt_level: int = 0  # 0: TVM's default (3)
    # Disassembler command for the built library, and the regex of a vector instruction in its output:
    # `socc inspect` reports each kernel's instruction count and vector share from them.
    objdump: tuple[str, ...] = ()
    vector_asm_pattern: str = ""
    vector_float: bool = True  # the vector unit takes float math (false: float kernels stay scalar)
    # int8 layers requantize their accumulators in "float" (scale multiply, round) or "integer"
    # (fixed-point multiplier and shift: no float left in the kernel, for integer vector units).
    requantize: str = "float"
    # Convolutions' layout: "NCHW" (the ONNX model's) or "NHWC" (the convert-layout pass: channels
    # innermost, what vector units with wide integer lanes want).
    layout: str = "NCHW"
    # "tvm": the artifact runs on the TVM runtime (model.so + run_model). "static": no TVM runtime
    # on the unit here, so socc also writes a static program (generated C driver + C runtime) that
    # calls the kernels directly; `cc` compiles C for the unit, `ld` links objects.
    runtime: str = "tvm"
    cc: tuple[str, ...] = ()
    ld: tuple[str, ...] = ()
    # A SoC profile's units and their facts ([units.cpu], [units.apu], [units.dsp] in TOML), and the
    # unit the `partition` pass hands work to ("" for none): its `ops`, `dtypes`, `max_rank`, `min_macs`.
    units: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    accelerator: str = ""

    @property
    def is_host(self) -> bool:
        return self.triple == "host"

    @property
    def llvm_mattr(self) -> list[str]:
        enabled = ["+" + _LLVM_FEATURE_NAMES.get(f, f) for f in self.features]
        return enabled + ["-" + _LLVM_FEATURE_NAMES.get(f, f) for f in self.disabled_features]

    def tvm_target_json(self) -> dict[str, Any]:
        """The TVM target as the JSON dict TVM 0.27 takes."""
        if self.is_host:
            return _host_target()
        target: dict[str, Any] = {"kind": "llvm", "mtriple": self.triple}
        if self.cpu and self.cpu != "generic":
            target["mcpu"] = self.cpu
        if self.features or self.disabled_features:
            target["mattr"] = self.llvm_mattr
        if self.llvm_opt_level:
            target["opt-level"] = self.llvm_opt_level
        return target

    def schedule_vector_bits(self) -> int:
        """The vector width the vectorize pass schedules for: the profile's; on the host (whose
        profile says 0), this CPU's: 512 with AVX-512 (the host target turns off LLVM's preference
        for 256-bit vectors there), 256 with AVX2, else 128 (SSE2 on x86-64, NEON on aarch64)."""
        if self.vector_bits or not self.is_host:
            return self.vector_bits
        features = self.llvm_features()
        return 512 if "avx512f" in features else 256 if "avx2" in features else 128

    def llvm_features(self) -> tuple[str, ...]:
        """The CPU features LLVM will generate code for: the profile's own (`+name` attributes), on
        the host what LLVM detects on this CPU (e.g. `avx512vnni`, which the int8 GEMM schedule uses)."""
        if not self.is_host:
            return tuple(_LLVM_FEATURE_NAMES.get(f, f) for f in self.features)
        return _host_features()

    def for_abi(self, abi: str, cc: str | None = None) -> "TargetProfile":
        """The same profile for another ABI: `gnu` (Linux, the default) or `android` (NDK clang)."""
        if abi == "gnu":
            return self if cc is None else dataclasses.replace(self, cxx=(cc,))
        if abi != "android":
            raise UserError(f"unknown ABI {abi!r}: use 'gnu' or 'android'")
        if self.is_host or not self.android_triple:
            raise UserError(f"target {self.name!r} has no Android ABI")
        if cc is None:
            raise UserError("--abi android needs --cc PATH (the NDK's clang++ for aarch64, e.g. aarch64-linux-android33-clang++)")
        # An Android build cannot be run under qemu-user with a glibc sysroot.
        return dataclasses.replace(self, triple=self.android_triple, cxx=(cc,), emulator=())

    @property
    def is_static(self) -> bool:
        return self.runtime == "static"

    @property
    def accelerator_facts(self) -> dict[str, Any]:
        """The facts of the unit subgraphs are partitioned to (empty: the whole model runs on the CPU)."""
        return {"name": self.accelerator, **self.units[self.accelerator]} if self.accelerator else {}

    def with_host_cpu(self) -> "TargetProfile":
        """This SoC with the host standing in for its CPU: the same partition, built and run here.

        It is how a partitioned program is verified without a phone: every part, the accelerator
        subgraphs included, is compiled for the host CPU."""
        host = load_profile("host")
        return dataclasses.replace(self, name=f"{self.name}@host", triple=host.triple, cpu=host.cpu, arch=host.arch,
                                   features=host.features, vector_bits=host.vector_bits, cxx=(), emulator=(),
                                   android_triple="", objdump=(), vector_asm_pattern="")

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _read_toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def _resolve(raw: dict[str, Any], source: str, seen: tuple[str, ...] = ()) -> TargetProfile:
    data = dict(raw)
    parent = data.pop("extends", None)
    if parent is not None:
        if parent in seen:
            raise UserError(f"target profile {source}: 'extends' loops through {parent!r}")
        base = dataclasses.asdict(_resolve(_read_toml(PROFILE_DIR / f"{parent}.toml"), parent, seen + (parent,)))
        units = {name: dict(facts) for name, facts in base["units"].items()}
        for name, facts in data.pop("units", {}).items():  # a child's unit facts add to its parent's
            units[name] = {**units.get(name, {}), **facts}
        base.update(data, units=units)
        data = base
    fields = {f.name for f in dataclasses.fields(TargetProfile)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise UserError(f"target profile {source}: unknown keys {', '.join(unknown)}")
    for key in ("features", "cxx", "emulator", "supported_ops", "default_passes", "disabled_features", "cc", "ld", "objdump"):
        data[key] = tuple(data.get(key, ()))
    data.setdefault("family", data.get("name", source))
    if data.get("accelerator") and data["accelerator"] not in data.get("units", {}):
        raise UserError(f"target profile {source}: accelerator {data['accelerator']!r} has no [units.{data['accelerator']}] table")
    if data.get("requantize", "float") not in REQUANTIZE_MODES:
        raise UserError(f"target profile {source}: requantize must be one of {', '.join(REQUANTIZE_MODES)}, not {data['requantize']!r}")
    if data.get("layout", "NCHW") not in LAYOUTS:
        raise UserError(f"target profile {source}: layout must be one of {', '.join(LAYOUTS)}, not {data['layout']!r}")
    if data.get("runtime", "tvm") not in ("tvm", "static"):
        raise UserError(f"target profile {source}: runtime must be 'tvm' or 'static', not {data['runtime']!r}")
    try:
        return TargetProfile(**data)
    except TypeError as exc:
        raise UserError(f"target profile {source}: {exc}") from None


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path) -> TargetProfile:
    """A profile by name (`arm-cpu`) or from a TOML file of the user's."""
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise UserError(f"target profile file not found: {path}")
        try:
            return _resolve(_read_toml(path), str(path))
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"target profile {path}: bad TOML: {exc}") from None
    name = str(name_or_path)
    if name not in profile_names():
        raise UserError(f"unknown target {name!r}; known: {', '.join(profile_names())}")
    return _resolve(_read_toml(PROFILE_DIR / f"{name}.toml"), name)


def all_profiles() -> list[TargetProfile]:
    return [load_profile(n) for n in profile_names()]


@functools.lru_cache(maxsize=1)
def _host_features() -> tuple[str, ...]:
    """The features LLVM detects on this CPU (asked once per process: the host target and the
    schedule's vector width both need them, on every compile)."""
    import tvm
    from tvm.target import codegen  # compiler-side import, only when building

    return tuple(sorted(str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}))))


def _host_target() -> dict[str, Any]:
    """This CPU as a TVM target. On AVX-512 CPUs LLVM's tuning prefers 256-bit vectors (Intel cores
    lower their clock on 512-bit ones) and splits every 512-bit operation in two; socc's kernels are
    dense tiles that run faster on the full width (MiniLM seq 128, 2 threads, on a Xeon with
    AVX-512: 20.1 -> 16.6 ms), so the preference is turned off."""
    from tvm.target import codegen  # compiler-side import, only when building

    target: dict[str, Any] = {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}
    if "avx512f" in _host_features():
        target["mattr"] = ["-prefer-256-bit"]
    return target
