"""Task YAMLs, one folder per benchmark (see eval.registry for the keys and how to add one)."""
