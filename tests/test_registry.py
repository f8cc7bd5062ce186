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


def test_hub_weights_offline_read_only_the_cache(tiny_arch, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never reach the network (tests/test_hub_weights.py: the cache)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    registry.register_weights(tiny_arch, "hub", registry.WeightsCfg(hf_hub_id="org/repo", filename="model.safetensors"))
    try:
        with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set and org/repo/model.safetensors"):
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


# ---- one weights table, sha256 on load -------------------------------------------------------------------------


def test_every_shipped_weight_is_listed_and_loads_in_a_fresh_interpreter():
    """`zoo list --pretrained` shows every shipped name and each loads without importing eval or a family first,
    and its file matches its recorded hash. One subprocess for both: importing the families dominates its time."""
    import subprocess
    import sys

    from zoo.checkpoint import sha256_file
    from zoo.weights_table import SHIPPED

    assert set(SHIPPED) == {"clip_vit_tiny4.shapes", "moe_llava_tiny.shapes", "uni_moe_tiny.shapes_av", "dit_moe_tiny.digits",
                            "digit_cnn.digits"}
    for name, cfg in SHIPPED.items():
        assert cfg.sha256 == sha256_file(registry.resolve_weights_dir(cfg, name) / registry.WEIGHTS_NAME)
    code = (
        "import sys, zoo, zoo.cli\n"
        "zoo.cli.main(['list', '--pretrained'])\n"
        "for name in ('clip_vit_tiny4.shapes', 'moe_llava_tiny.shapes', 'uni_moe_tiny.shapes_av', 'dit_moe_tiny.digits',"
        " 'digit_cnn.digits'):\n"
        "    m = zoo.load(name)\n"
        "    print(name, type(m).__name__, sum(p.numel() for p in m.parameters()), m.training)\n"
        "print('eval imported:', any(k == 'eval' or k.startswith('eval.') for k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    listed = {line.split()[0] for line in out[:-6]}
    assert any(line.split()[0] == "digit_cnn.digits" and "offline" in line for line in out[:-6])
    for name in (*SHIPPED, "moe_llava_phi2_4e.official", "dit_moe_xl_2_8e2a.official"):
        assert name in listed
    assert out[-6:] == [
        "clip_vit_tiny4.shapes CLIP 4114945 False",
        "moe_llava_tiny.shapes MoELLaVA 2501282 False",
        "uni_moe_tiny.shapes_av UniMoE 3645695 False",
        "dit_moe_tiny.digits DiT 627744 False",
        "digit_cnn.digits DigitCNN 28218 False",
        "eval imported: False",
    ]


@pytest.fixture
def shipped_copy(tmp_path):
    """A copy of the digit classifier's shipped directory, registered as test weights with the recorded hash."""
    import shutil

    from zoo.weights_table import DIGIT_CNN_DIGITS

    copy = tmp_path / "digit_cnn_copy"
    shutil.copytree(registry.SHIPPED_WEIGHTS_DIR / DIGIT_CNN_DIGITS.file, copy)
    registry.register_weights("digit_cnn", "test_copy", registry.WeightsCfg(file=str(copy), sha256=DIGIT_CNN_DIGITS.sha256))
    yield copy
    registry._WEIGHTS.pop("digit_cnn.test_copy")


def test_intact_copy_of_shipped_weights_loads(shipped_copy):
    original = registry.load("digit_cnn.digits").state_dict()
    copy = registry.load("digit_cnn.test_copy").state_dict()
    assert original.keys() == copy.keys() and all(torch.equal(original[k], copy[k]) for k in original)


def test_tampered_shipped_weights_are_refused_with_both_hashes(shipped_copy):
    from zoo.checkpoint import sha256_file
    from zoo.weights_table import DIGIT_CNN_DIGITS

    weights = shipped_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor: still a valid safetensors file, different weights
    weights.write_bytes(bytes(data))
    actual = sha256_file(weights)
    assert actual != DIGIT_CNN_DIGITS.sha256
    with pytest.raises(registry.WeightsHashMismatchError) as err:
        registry.load("digit_cnn.test_copy")
    message = str(err.value)
    assert str(weights) in message and DIGIT_CNN_DIGITS.sha256 in message and actual in message
    # a directory loaded by path has no recorded hash to compare with: it loads, and differs in that one tensor
    tampered, original = registry.load(shipped_copy).state_dict(), registry.load("digit_cnn.digits").state_dict()
    assert sum(not torch.equal(tampered[k], original[k]) for k in original) == 1


def test_recipe_init_from_weights_name_checks_the_hash_too(shipped_copy, tmp_path):
    """`init_from: arch.tag` resolves through the same path as zoo.load, so a damaged file is refused there as well."""
    from zoo.recipe import StageSpec
    from zoo.train import resolve_init_source

    stage = StageSpec(name="s", type="runner_tiny_regression", batch_size=1, init_source=("weights", "digit_cnn.test_copy"))
    assert resolve_init_source(stage, None, tmp_path) == shipped_copy
    weights = shipped_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(registry.WeightsHashMismatchError):
        resolve_init_source(stage, None, tmp_path)


# ---- one strict-load helper ------------------------------------------------------------------------------------


def test_strict_load_error_lists_counts_and_first_keys_of_each_kind(tmp_path, tiny_arch):
    from zoo.checkpoint import SHOWN_KEYS, CheckpointMismatchError, load_state_dict_strict

    model = registry.create_model(tiny_arch, width=6)
    state = dict(model.state_dict())
    del state["proj.bias"]
    state["proj.weight"] = torch.zeros(6, 5)
    for i in range(SHOWN_KEYS + 3):
        state[f"extra.{i:02d}"] = torch.zeros(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict_strict(model, state, tmp_path / "ckpt.safetensors", "tiny_arch_v2")
    shown = ", ".join(f"extra.{i:02d}" for i in range(SHOWN_KEYS))
    assert str(err.value) == (
        f"{tmp_path / 'ckpt.safetensors'}: checkpoint does not match tiny_arch_v2: 1 missing keys [proj.bias]; "
        f"{SHOWN_KEYS + 3} unexpected keys [{shown}, ... (3 more)]; "
        "1 shape mismatches [proj.weight: checkpoint (6, 5) vs model (6, 6)]"
    )
    # nothing was copied before the check failed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_strict_load_accepts_a_tied_tensor_under_either_name(tiny_arch):
    from zoo.checkpoint import CheckpointMismatchError, load_state_dict_strict

    source = registry.create_model(tiny_arch, width=6)
    target = registry.create_model(tiny_arch, width=6)
    state = {k: v for k, v in source.state_dict().items() if k != "embed.weight"}  # head.weight is the same tensor
    load_state_dict_strict(target, state, "mem")
    assert torch.equal(target.embed.weight, source.embed.weight) and target.head.weight is target.embed.weight
    untied = registry.create_model(tiny_arch, width=6, tied=False)
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys \[embed.weight\]"):
        load_state_dict_strict(untied, state, "mem")


def test_strict_load_on_meta_assigns_the_checkpoint_tensors(tiny_arch):
    from zoo.checkpoint import load_state_dict_strict

    source = registry.create_model(tiny_arch, width=6, tied=False)
    with torch.device("meta"):
        target = registry.create_model(tiny_arch, width=6, tied=False)
    load_state_dict_strict(target, source.state_dict(), "mem")
    assert not any(p.is_meta for p in target.parameters())
    assert target.proj.weight.data_ptr() == source.proj.weight.data_ptr() and target.proj.weight.requires_grad


# ---- converters register how to recognise their layout -----------------------------------------------------------


def test_load_asks_the_converter_table_for_a_directory_that_is_not_ours(tmp_path, tiny_arch):
    """A new layout needs only register_converter: zoo.load, detect_format, load_released and `zoo convert` use it."""
    from zoo import convert as conv

    def detect(src):
        return (src / "weights.pt").is_file()

    def load_fn(src, width=6):
        from zoo.checkpoint import load_state_dict_strict

        model = registry.create_model(tiny_arch, width=int(width))  # the CLI passes options as strings
        return load_state_dict_strict(model, torch.load(src / "weights.pt", weights_only=True), src / "weights.pt")

    def convert_fn(src, out, width=6):
        return registry.save_pretrained(load_fn(src, width), out, tiny_arch, {"width": int(width)})

    torch.manual_seed(1)
    reference = registry.create_model(tiny_arch, width=6)
    (tmp_path / "release").mkdir()
    torch.save(reference.state_dict(), tmp_path / "release" / "weights.pt")
    conv.register_converter("test-layout", detect=detect, load=load_fn, convert=convert_fn,
                            options={"width": "model width"})
    try:
        assert conv.detect_format(tmp_path / "release") == "test-layout"
        loaded = registry.load(tmp_path / "release")
        assert not loaded.training and torch.equal(loaded.proj.weight, reference.proj.weight)
        assert conv.main(["auto", str(tmp_path / "release"), str(tmp_path / "cli"), "--width", "6"]) == 0
        assert torch.equal(registry.load(tmp_path / "cli").proj.weight, reference.proj.weight)
        out = conv.convert(tmp_path / "release", tmp_path / "out", "test-layout", width=6)
        assert torch.equal(registry.load(out).proj.weight, reference.proj.weight)
        with pytest.raises(ValueError, match="template do not apply to format 'test-layout'"):
            conv.load_released(tmp_path / "release", template="plain")
        with pytest.raises(ValueError, match="registered twice"):
            conv.register_converter("test-layout", detect=detect, load=load_fn, convert=convert_fn)
    finally:
        conv._CONVERTERS.pop("test-layout")


def test_unknown_layouts_name_the_path_and_the_registered_converters(tmp_path):
    from zoo.convert import detect_format, list_converters

    assert {"moe-llava", "llava-hf", "dit"} <= set(list_converters())
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match=r"gpt2: not a format zoo convert knows \(registered: .*dit.*llava-hf"):
        detect_format(tmp_path / "gpt2")
    with pytest.raises(FileNotFoundError, match="not an mmzoo checkpoint .* not a format zoo convert knows"):
        registry.load(tmp_path / "gpt2")
    (tmp_path / "notes.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a format"):
        detect_format(tmp_path / "notes.pt")
