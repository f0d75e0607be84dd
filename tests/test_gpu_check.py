"""scripts/gpu-check.sh without a GPU: --dry-run lists what it would run and checks the wheels
and the profile commands' options; the wheel list is asap's dependencies less torch's."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent
SCRIPT = CHECKOUT / "scripts" / "gpu-check.sh"
spec = importlib.util.spec_from_file_location("wheel_list", CHECKOUT / "scripts" / "wheel_list.py")
wheel_list = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheel_list)


@pytest.fixture
def wheels(tmp_path) -> Path:
    """A wheels folder as --fetch-wheels leaves it (the files empty: the dry run reads names)."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    lines = wheel_list.requirements("3.12")
    (folder / "requirements.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        name, version = line.split("==")
        (folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    return folder


def dry_run(*args):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(Path.home())}
    command = ["bash", str(SCRIPT), "--dry-run", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False)


def test_the_wheel_list_is_asaps_dependencies_pinned_less_torchs():
    names = {line.split("==")[0] for line in wheel_list.requirements("3.12")}
    assert {"transformers", "typer", "rich", "pillow", "fvcore", "accelerate", "pytest", "numpy"} <= names
    assert not names & {"torch", "sympy", "networkx", "jinja2", "fsspec", "filelock", "hf-xet"}
    assert "transformers==5.23.0" in wheel_list.requirements("3.12")  # the version tested here
    skipped = wheel_list.requirements("3.12", {"numpy"})
    assert any(line.startswith("# numpy==") for line in skipped) and not any(
        line.startswith("numpy") for line in skipped
    )


def test_dry_run_lists_every_step_and_checks_without_a_gpu(wheels, tmp_path):
    result = dry_run("--wheels", str(wheels), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    assert "-m pytest -p no:cacheprovider -v -m cuda tests" in text and "-m 'not cuda' tests" in text
    for model in ("llava-1.5-7b", "llava-next-7b"):
        command = (
            f"-m asapcli profile -m {model} --random-weights --device cuda --dtype bfloat16 "
            "--methods vanilla,fastv,asap -k 192,128,64"
        )
        assert command in text and f"--json > {tmp_path / 'out'}/{model}.jsonl" in text
        assert f"ok: asap profile -m {model}" in text  # its options parsed by the CLI
    assert f"ok: every wheel of {wheels}/requirements.txt is there" in text
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_fails_on_a_missing_wheel(wheels, tmp_path):
    next(wheels.glob("transformers-*.whl")).unlink()
    result = dry_run("--wheels", str(wheels))
    assert result.returncode == 1
    assert f"no wheel of transformers==5.23.0 in {wheels}" in result.stderr


def test_the_wheel_check_reads_skipped_lines_and_refuses_two_versions(wheels):
    lines = (wheels / "requirements.txt").read_text().splitlines()
    pillow = next(line for line in lines if line.startswith("pillow=="))
    (wheels / "requirements.txt").write_text("\n".join(f"# {line}" if line == pillow else line for line in lines))
    next(wheels.glob("pillow-*.whl")).unlink()
    assert wheel_list.check(wheels) == []  # skipped: the target has it
    (wheels / "numpy-1.0.0-py3-none-any.whl").write_bytes(b"")
    assert any("several wheels of numpy" in problem for problem in wheel_list.check(wheels))
    (wheels / "requirements.txt").write_text("\n".join(line for line in lines if line != pillow))
    assert f"{wheels}/requirements.txt lacks pillow, which asap needs" in wheel_list.check(wheels)


def test_the_check_itself_stops_before_anything_when_wheels_are_missing(tmp_path):
    """On a GPU lent for minutes: it once ran on and showed only 'install: exit 1'."""
    result = subprocess.run(
        ["bash", str(SCRIPT), "--wheels", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=CHECKOUT, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1 and "Error: the wheels are not all in" in result.stderr
    assert not (tmp_path / "out").exists()
