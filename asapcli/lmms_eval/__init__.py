"""asap in lmms-eval (docs/lmms-eval.md): the model `asap` (model.Asap), registered with lmms-eval by
plugin.MANIFEST (an entry point, and the launcher `python -m asapcli.lmms_eval`), and the offline
task `asap_demo` in TASKS.

Nothing here imports lmms-eval: it is an extra (`pip install "asapcli[eval]"`), and lmms-eval
imports plugin.py while it builds its own registry.
"""

from pathlib import Path

TASKS = Path(__file__).resolve().parent / "tasks"  # lmms-eval's --include_path for asap_demo
