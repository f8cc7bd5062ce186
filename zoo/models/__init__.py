"""Model families. Importing this package registers every family's architectures with zoo.registry (the weights
names are registered by zoo.weights_table)."""

from zoo.models import clip, digit_cnn, dit, flmm, moe_llava, uni_moe  # noqa: F401
