"""Studies over many trained models: parameter sweeps and effective model memorization (EMM)."""
