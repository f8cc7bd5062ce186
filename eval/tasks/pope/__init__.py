"""pope task YAMLs (data only; the package makes setuptools ship them)."""
