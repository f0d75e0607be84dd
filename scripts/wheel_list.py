"""The packages asap needs on a machine that has PyTorch and nothing else, pinned to the versions
installed here (those its tests pass with): scripts/gpu-check.sh fetches them as wheels.

    python scripts/wheel_list.py requirements [--python 3.12] [--skip numpy,...]   # name==version, one a line
    python scripts/wheel_list.py check DIR      # every requirement of DIR/requirements.txt has its wheel

The list is the closure of pyproject's dependencies and the `test` extra, less torch and what
torch itself needs (present wherever torch is), less what an offline machine never imports
(NOT_NEEDED_OFFLINE); markers are read for Linux x86-64 and the target's Python. Packages the
target is known to have can be skipped: they stay in the list as comments. Standard library and
`packaging` only.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CHECKOUT = Path(__file__).resolve().parent.parent
PROVIDED = "torch"  # the one package the target machine brings
NOT_NEEDED_OFFLINE = {"hf-xet"}  # huggingface-hub's downloader for xet storage: the check downloads nothing


def direct_requirements() -> list[Requirement]:
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["test"]]


def closure(roots: list[Requirement], environment: dict) -> dict[str, str]:
    """canonical name -> installed version of every package `roots` need, transitively; extras
    are not followed."""
    found: dict[str, str] = {}
    pending = list(roots)
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({**environment, "extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here: install asap's dependencies first") from None
        pending += [Requirement(text) for text in metadata.requires(name) or []]
    return found


def requirements(python: str, skip: set[str] = frozenset()) -> list[str]:
    """The pinned requirements, one a line; those in `skip` commented out (the target has them)."""
    environment = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0"}
    environment.update(sys_platform="linux", platform_system="Linux", platform_machine="x86_64")
    provided = closure([Requirement(PROVIDED)], environment)
    needed = closure([r for r in direct_requirements() if canonicalize_name(r.name) != PROVIDED], environment)
    skip = {canonicalize_name(name) for name in skip}
    lines = []
    for name, version in sorted(needed.items()):
        if name in provided or name in NOT_NEEDED_OFFLINE:
            continue
        lines.append(f"# {name}=={version}  (skipped: the target has it)" if name in skip else f"{name}=={version}")
    return lines


def wheel_name(filename: str) -> str:
    """The canonical project name of a wheel file (name-version-...-tags.whl)."""
    return canonicalize_name(filename.split("-")[0])


def check(folder: Path) -> list[str]:
    """What is wrong with `folder` as the wheels of the requirements it lists (empty: nothing)."""
    listed = folder / "requirements.txt"
    if not listed.is_file():
        return [f"{listed} is missing: run scripts/gpu-check.sh --fetch-wheels {folder}"]
    lines = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
    wanted = [line for line in lines if not line.startswith("#")]
    skipped = [line.lstrip("# ").split()[0] for line in lines if line.startswith("#")]
    wheels = {}
    for path in folder.glob("*.whl"):
        wheels.setdefault(wheel_name(path.name), []).append(path.name)
    problems = []
    for line in wanted:
        name, version = line.split("==")
        files = wheels.get(canonicalize_name(name), [])
        if not any(re.split(r"-", file)[1] == version for file in files):
            problems.append(f"no wheel of {line} in {folder}")
        if len(files) > 1:
            problems.append(f"several wheels of {name} in {folder}: {', '.join(files)}")
    direct = {canonicalize_name(r.name) for r in direct_requirements()} - {PROVIDED}
    missing = direct - {canonicalize_name(line.split("==")[0]) for line in wanted + skipped}
    problems += [f"{folder}/requirements.txt lacks {name}, which asap needs" for name in sorted(missing)]
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("requirements")
    listing.add_argument("--python", default="3.12", help="the target machine's Python (major.minor)")
    listing.add_argument("--skip", default="", help="comma-separated packages the target machine has")
    checking = commands.add_parser("check")
    checking.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.command == "requirements":
        print("\n".join(requirements(args.python, {name for name in args.skip.split(",") if name})))
        return
    problems = check(args.folder)
    for problem in problems:
        print(problem, file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
