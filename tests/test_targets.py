"""Target profiles are data: they load, compose by `extends`, and turn into valid TVM targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_socc
from toolchain.errors import UserError
from toolchain.targets import load_profile, profile_names

ARM_PROFILES = ["arm-cpu", "cortex-a55", "cortex-a76", "cortex-a78", "cortex-x3", "cortex-x4"]


def test_the_arm_family_is_there() -> None:
    assert set(ARM_PROFILES + ["host"]) <= set(profile_names())


@pytest.mark.parametrize("name", ARM_PROFILES)
def test_arm_profiles_resolve_to_aarch64_targets(name: str) -> None:
    import tvm

    profile = load_profile(name)
    assert profile.triple == "aarch64-linux-gnu"
    assert profile.vector_bits == 128 and "neon" in profile.features and "dotprod" in profile.features
    target = tvm.target.Target(profile.tvm_target_json())
    assert target.attrs["mtriple"] == "aarch64-linux-gnu"
    assert bool(target.attrs["feature.has_dotprod"])  # LLVM understood the features
    assert bool(target.attrs["feature.has_matmul_i8"]) == ("i8mm" in profile.features)


def test_real_feature_sets() -> None:
    assert "i8mm" not in load_profile("cortex-a76").features
    assert {"i8mm", "bf16", "sve2"} <= set(load_profile("cortex-x4").features)
    assert load_profile("cortex-a55").llvm_mattr == ["+v8.2a", "+neon", "+dotprod", "+fullfp16", "+rcpc"]


def test_user_profile_file_extends_a_shipped_one(tmp_path: Path) -> None:
    path = tmp_path / "my-phone.toml"
    path.write_text('name = "my-phone"\nextends = "cortex-a76"\ndescription = "test phone"\n')
    profile = load_profile(path)
    assert profile.cpu == "cortex-a76" and profile.cxx == ("aarch64-linux-gnu-g++",) and profile.name == "my-phone"


def test_bad_profile_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\nextends = "arm-cpu"\nvector_width = 256\n')
    with pytest.raises(UserError, match="unknown keys vector_width"):
        load_profile(path)


def test_android_abi_needs_a_compiler() -> None:
    with pytest.raises(UserError, match="--cc"):
        load_profile("arm-cpu").for_abi("android")
    android = load_profile("arm-cpu").for_abi("android", "/ndk/aarch64-linux-android33-clang++")
    assert android.triple == "aarch64-linux-android" and android.emulator == ()


def test_targets_command_lists_profiles_as_json() -> None:
    result = run_socc("targets", "--json")
    assert result.code == 0
    names = {t["name"]: t for t in json.loads(result.stdout)["targets"]}
    assert names["cortex-x3"]["features"][:2] == ["v9a", "neon"]
