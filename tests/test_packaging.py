"""The package as a user installs it: presets and the bundled model found however asapcli is
installed (editable, or built into site-packages while the tests run from the checkout)."""

import subprocess
import sys
import tomllib
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def test_presets_are_found_from_a_checkout_with_no_installed_mapping():
    """`python -S` starts with no site-packages, so no editable-install finder maps profiles/ to
    asapcli.profiles: the state of a checkout next to a non-editable install."""
    script = (
        f"import sys; sys.path.insert(0, {str(CHECKOUT)!r}); "
        "from asapcli.runtime.presets import find_preset, preset_names; "
        "print(','.join(preset_names())); print(find_preset('demo').bundled_path())"
    )
    result = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    names, bundled = result.stdout.splitlines()
    assert {"demo", "llava-1.5-7b", "bench"} <= set(names.split(","))
    assert (Path(bundled) / "config.json").is_file()


def test_every_package_of_the_source_is_in_the_distribution():
    """pyproject lists the packages by name (profiles/ is mapped into asapcli): a new subpackage
    left off the list works in an editable install and is missing from a built one, as
    asapcli.engine.cost once was."""
    listed = set(tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        ".".join(init.parent.relative_to(CHECKOUT).parts) for init in (CHECKOUT / "asapcli").rglob("__init__.py")
    }
    assert folders <= listed, f"missing from [tool.setuptools] packages: {sorted(folders - listed)}"
