"""Model presets, one TOML file per model; read by asapcli.presets (installed as asapcli.profiles)."""
