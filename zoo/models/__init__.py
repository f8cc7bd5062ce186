"""Model families. Importing this package registers every family's names with zoo.registry."""

from zoo.models import clip, dit, moe_llava  # noqa: F401
