"""Settings are parsed once where they are made and trusted after: one `asap run` makes its
PruneSettings once (every check once, the method object once) and checks them against the model
once; the block, the plans of each forward call and the report never check or rebuild them."""

from __future__ import annotations

import json
from collections import Counter

from asapcli.engine import settings as settings_module
from asapcli.engine.settings import PruneSettings

CHECKS = ("method_classes", "check_numbers", "check_layer", "check_options", "_configured")


def test_one_asap_run_checks_its_settings_once(asap, monkeypatch):
    calls: Counter[str] = Counter()

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    for name in CHECKS:
        monkeypatch.setattr(settings_module, name, counted(name, getattr(settings_module, name)))
    monkeypatch.setattr(PruneSettings, "__init__", counted("PruneSettings", PruneSettings.__init__))
    for_model = PruneSettings.for_model

    def checked_against(self, num_layers):
        if self.num_layers != num_layers:  # the check runs; settings checked already come back as they are
            calls["for_model"] += 1
        return for_model(self, num_layers)

    monkeypatch.setattr(PruneSettings, "for_model", checked_against)

    result = asap("run", "examples/car.png", "what colour is the car?", "-k", 64, "--layer", 2, "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["method"], record["k"], record["layer"]) == ("asap", 64, 2) and record["kept_tokens"] == 64
    assert calls == {name: 1 for name in (*CHECKS, "PruneSettings", "for_model")}
