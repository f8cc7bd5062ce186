"""The recipe-facing config dataclasses of each stage type (``ModelConfig`` / ``DataConfig`` / ``EvalConfig``), one
module per stage module of ``zoo/stages``. They import neither torch, transformers nor Lightning, so the recipe
validator (``zoo train --check``, and the check before any training) finds and uses them without importing the stage
module: ``zoo.stages.stage_configs`` reads which classes a stage names, and where it imports them from, with ``ast``.
"""
