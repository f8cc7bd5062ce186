"""The registry's one loading path: save_pretrained -> config.json + safetensors -> zoo.load, strict."""

import json

import pytest
import torch
from torch import nn

from zoo import registry


class _Tiny(nn.Module):
    def __init__(self, width: int = 4, tied: bool = True):
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.head = nn.Linear(width, 10, bias=False)
        if tied:  # shared tensors must survive safetensors, which refuses aliased storage by default
            self.head.weight = self.embed.weight
        self.proj = nn.Linear(width, width)


@pytest.fixture
def tiny_arch():
    name = "test_tiny_registry_arch"
    registry.register_model(_Tiny, name=name, family="test")
    yield name
    registry._MODELS.pop(name, None)


def test_save_load_round_trip(tmp_path, tiny_arch):
    torch.manual_seed(0)
    model = registry.create_model(tiny_arch, width=6)
    out = registry.save_pretrained(model, tmp_path / "ckpt", tiny_arch, {"width": 6}, recipe="test")
    config = json.loads((out / "config.json").read_text())
    assert config == {"architecture": tiny_arch, "model_args": {"width": 6}, "recipe": "test"}
    loaded = registry.load(out)
    assert not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr()
    # no temp files are left beside the checkpoint
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_load_is_strict(tmp_path, tiny_arch):
    model = registry.create_model(tiny_arch, width=6)
    out = registry.save_pretrained(model, tmp_path / "ckpt", tiny_arch, {"width": 6})
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_args"]["width"] = 8
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="size mismatch|does not match|shape"):
        registry.load(out)


def test_missing_config_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        registry.load(tmp_path)


def test_unknown_names_are_clear():
    with pytest.raises(KeyError, match="unknown model 'no_such_model'"):
        registry.create_model("no_such_model")
    with pytest.raises(KeyError, match="no weights named 'no_such.tag'"):
        registry.load("no_such.tag")


def test_hub_only_weights_never_download(tiny_arch):
    registry.register_weights(tiny_arch, "hub", registry.WeightsCfg(hf_hub_id="org/repo", filename="model.safetensors"))
    try:
        with pytest.raises(FileNotFoundError, match="never downloads"):
            registry.load(f"{tiny_arch}.hub")
    finally:
        registry._WEIGHTS.pop(f"{tiny_arch}.hub")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        registry.atomic_write(target, broken)
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]



def test_atomic_write_gives_ordinary_file_mode(tmp_path):
    import os

    target = tmp_path / "weights.bin"
    registry.atomic_write(target, lambda tmp: open(tmp, "wb").write(b"x"))
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_import_zoo_is_light():
    import subprocess
    import sys

    code = "import sys, zoo; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
