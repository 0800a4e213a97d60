"""The shared replica auditor (imports neither the EDM nor the Stable Diffusion code)."""


def __getattr__(name):
    # Lazy: `from sdmem.audit import audit` without importing torch-heavy modules for replicas-only users.
    if name in ("audit", "audit_distributed", "AuditReport"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["audit", "audit_distributed", "AuditReport"]
