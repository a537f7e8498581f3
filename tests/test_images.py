"""The container images' sources agree with the project: pins, copied sources, commands, tags.

Building the images needs docker or buildah (scripts/images.sh); these checks
need neither.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [
    ROOT / "Dockerfile",
    ROOT / "trial-images" / "synthetic" / "Dockerfile",
    ROOT / "trial-images" / "pytorch-mlp" / "Dockerfile.cpu",
    ROOT / "trial-images" / "pytorch-mlp" / "Dockerfile.gpu",
]
LINUX = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{path.name}: not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = version
    return pins


def _app_version() -> str:
    chart = yaml.safe_load((ROOT / "charts" / "kubetune" / "Chart.yaml").read_text())
    return str(chart["appVersion"])


def _base_default(dockerfile: Path) -> str:
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile.read_text(), re.MULTILINE)
    assert match, f"{dockerfile}: no ARG BASE_IMAGE default"
    return match.group(1)


def test_every_runtime_dependency_is_pinned_to_a_version_it_accepts() -> None:
    pins = _pins(ROOT / "requirements" / "runtime.txt")
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        if requirement.marker is not None and not requirement.marker.evaluate(LINUX):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} (pyproject.toml) is not pinned in requirements/runtime.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements/runtime.txt pins {name}=={pins[name]}, outside {requirement.specifier}"
        )
    assert "kubetune" not in pins
    _pins(ROOT / "requirements" / "build.txt")  # exact pins there too


def test_the_kubetune_image_copies_every_source_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (?!--from)(.+) /src/?\S*$", text, re.MULTILINE)
    sources = {s for line in copied for s in line.split()}
    find = _pyproject()["tool"]["setuptools"]["packages"]["find"]  # type: ignore[index]
    for root in find["where"]:
        packages = [p.parent for p in (ROOT / root).glob("*/__init__.py")]
        assert packages, root
        for package in packages:
            rel = package.relative_to(ROOT).as_posix()
            assert any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in sources), (
                f"the Dockerfile does not copy {rel}"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_images_run_as_non_root_with_python_on_path(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert re.search(r"^USER 65532:65532$", text, re.MULTILINE)
    assert re.search(r"^ARG BASE_IMAGE=", text, re.MULTILINE)
    assert "FROM ${BASE_IMAGE}" in text
    for label in ("title", "description", "version", "revision", "created", "source"):
        assert f"org.opencontainers.image.{label}=" in text, label
    assert "PYTHONUNBUFFERED=1" in text
    assert "PYTHONDONTWRITEBYTECODE=1" in text


def test_cpu_images_share_the_base_and_the_gpu_image_keeps_a_cuda_one() -> None:
    kubetune = _base_default(ROOT / "Dockerfile")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", kubetune)
    assert _base_default(DOCKERFILES[1]) == kubetune
    assert _base_default(DOCKERFILES[2]) == kubetune
    assert "cuda" in _base_default(DOCKERFILES[3])


def test_dockerignore_keeps_what_the_dockerfiles_copy() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    }
    for dockerfile in DOCKERFILES:
        for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile.read_text(), re.MULTILINE):
            for source in line.split()[:-1]:
                assert source.split("/")[0] not in ignored, f"{dockerfile.name}: {source}"
    assert ".git" in ignored


def test_chart_commands_run_modules_of_the_distribution() -> None:
    templates = ROOT / "charts" / "kubetune" / "templates"
    commands = re.findall(
        r"command: \[python, -m, ([\w.]+)\]",
        "".join(p.read_text() for p in templates.glob("*.yaml")),
    )
    from kubetune_controller.settings import settings_from_env

    collector = settings_from_env({}).collector_command
    assert collector[:2] == ("python", "-m")
    modules = {*commands, collector[2]}
    assert modules == {
        "kubetune_controller",
        "kubetune_suggestion.service",
        "kubetune_suggestion.collector",
    }
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module


def test_chart_default_image_tag_is_the_app_version() -> None:
    values = yaml.safe_load((ROOT / "charts" / "kubetune" / "values.yaml").read_text())
    # No registry host by default: the images are built locally and pushed to
    # a registry of the user's own, named by image.registry.
    assert values["image"]["registry"] == ""
    assert values["image"]["repository"] == "kubetune/kubetune"
    assert values["image"]["tag"] == ""
    helpers = (ROOT / "charts" / "kubetune" / "templates" / "_helpers.tpl").read_text()
    assert "(default .Chart.AppVersion .Values.image.tag)" in helpers
    helm = os.environ.get("KUBETUNE_HELM") or shutil.which("helm")
    if helm is None:
        return
    rendered = subprocess.run(
        [helm, "template", "kt", str(ROOT / "charts" / "kubetune"), "--kube-version", "1.36.0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    images = set(re.findall(r"image: \"?([^\"\s]+)", rendered))
    assert images == {f"kubetune/kubetune:{_app_version()}"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_images_script_prints_the_archives_it_writes(tmp_path: Path) -> None:
    def archives(*args: str) -> list[str]:
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "images.sh"), "--print-archives", *args],
            env={**os.environ, "KUBETUNE_IMAGES_OUT": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout.splitlines()

    version = _app_version()
    default = [
        f"{tmp_path}/python-base-bookworm.tar",
        f"{tmp_path}/kubetune-{version}.tar",
        f"{tmp_path}/trial-synthetic-{version}.tar",
    ]
    assert archives() == default
    assert archives("--all") == [
        *default,
        f"{tmp_path}/trial-pytorch-mlp-{version}-cpu.tar",
        f"{tmp_path}/trial-pytorch-mlp-{version}-gpu.tar",
    ]
    assert not list(tmp_path.iterdir())  # printing builds nothing


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_images_script_names_images_without_a_registry_host() -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "images.sh"), "--print-images", "--all"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    version = _app_version()
    base, *images = result.stdout.splitlines()
    # The local base is never pushed: localhost/ keeps it off every registry.
    assert base == "localhost/kubetune/python-base:bookworm"
    assert images == [
        f"kubetune/kubetune:{version}",
        f"kubetune/trial-synthetic:{version}",
        f"kubetune/trial-pytorch-mlp:{version}-cpu",
        f"kubetune/trial-pytorch-mlp:{version}-gpu",
    ]
    # The chart's default image is the one the script builds.
    values = yaml.safe_load((ROOT / "charts" / "kubetune" / "values.yaml").read_text())
    assert f"{values['image']['repository']}:{version}" in images
