"""The `crepa-mem` command line (installed as the `crepa_mem.cli` package)."""
