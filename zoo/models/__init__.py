"""Model families. Importing this package registers every family's names (and shipped weights) with zoo.registry."""

from zoo import weights_table  # noqa: F401  (shipped MoE-LLaVA demo weights)
from zoo.models import clip, dit, moe_llava  # noqa: F401
