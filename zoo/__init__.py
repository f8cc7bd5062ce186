"""mmzoo: a multimodal mixture-of-experts model zoo."""

from zoo.registry import create_model, list_models, list_pretrained, load, save_pretrained

__all__ = ["create_model", "list_models", "list_pretrained", "load", "save_pretrained"]
__version__ = "0.1.0"
