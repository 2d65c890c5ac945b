"""The quotas stage (being built; no hooks yet)."""
