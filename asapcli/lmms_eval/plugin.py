"""The registration lmms-eval 0.7 reads for a model outside its tree: a manifest that names the
class. Declared as an entry point (group `lmms_eval.models`), so `python -m lmms_eval --model asap`
finds it once asapcli is installed; the launcher registers it too, for a checkout on PYTHONPATH."""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="asap", simple_class_path="asapcli.lmms_eval.model.Asap")
