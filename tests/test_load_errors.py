"""Issue 19: damaged or hostile inputs to loading, converting and sampling are one clear error naming the file;
DiT's own training checkpoints convert (EMA weights) without switching the safe unpickler off; an MoE layer takes
zero tokens."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
from zoo.registry import list_models, register_model, save_pretrained

HERE = Path(__file__).parent


class TinyLinear(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.proj = nn.Linear(width, width)


if "load_errors_tiny_linear" not in list_models():
    register_model(lambda **kw: TinyLinear(**kw), name="load_errors_tiny_linear")


@pytest.fixture
def exported(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_pretrained(TinyLinear(4), tmp_path / "m", "load_errors_tiny_linear", {"width": 4})


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["truncated", "empty"])
def test_truncated_or_empty_safetensors_names_the_file(exported, keep):
    weights = exported / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file .*truncated or empty"):
        zoo.load(exported)


def test_invalid_config_json_names_the_file(exported):
    (exported / "config.json").write_text('{"architecture": "load_errors_tiny_linear", "model_args": {')
    with pytest.raises(ValueError, match=rf"{exported / 'config.json'}: not valid JSON"):
        zoo.load(exported)
    (exported / "config.json").write_bytes(b'{"architecture": "\xff\xfe"}')
    with pytest.raises(ValueError, match=rf"{exported / 'config.json'}: not valid JSON"):
        zoo.load(exported)


def test_unknown_model_args_key_names_the_file_and_key(exported):
    config = json.loads((exported / "config.json").read_text())
    config["model_args"]["widht"] = 4
    (exported / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{exported / 'config.json'}: cannot build 'load_errors_tiny_linear' "
                                         r"from its model_args: .*'widht'"):
        zoo.load(exported)
    config["model_args"] = [4]
    (exported / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'model_args' is missing or not a mapping"):
        zoo.load(exported)


def test_sample_cli_reports_a_damaged_model_in_one_line(exported, capsys):
    from zoo.sample import main

    (exported / "model.safetensors").write_bytes(b"")
    assert main(["--model", str(exported), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the loading bar
    assert last.startswith("zoo sample: ") and "not a readable safetensors file" in last and "Traceback" not in err


class Planted:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_pickle_given_to_convert_is_refused_without_suggesting_unsafe_loading(tmp_path, capsys):
    from zoo.convert.dit import main

    src = tmp_path / "evil.pt"
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "payload": Planted()}, src)
    assert main(["dit_xl_2", str(src), str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert "code ran" not in captured.out
    assert f"{src}: refused: the file holds Python objects" in captured.err
    assert "weights_only=False" not in captured.err and "weights_only" not in captured.err
    assert not (tmp_path / "out").exists()


def _dit_test_helpers():
    spec = importlib.util.spec_from_file_location("dit_checkpoint_helpers", HERE / "dit" / "test_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_reads_dit_training_checkpoints_and_takes_the_ema_weights(tmp_path, capsys):
    from zoo.convert import main as convert_main

    h = _dit_test_helpers()
    shapes = h.official_dit_moe_shapes(2, 32, 2, 4, True, latent=8, classes=10)
    ema, raw = h.random_state(shapes, seed=5), h.random_state(shapes, seed=6)
    src = tmp_path / "0400000.pt"  # what DiT's train.py writes: model, ema, opt and its argparse.Namespace
    args = argparse.Namespace(model="DiT-XL/2", image_size=256, global_batch_size=256, lr=1e-4)
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": args}, src)
    assert convert_main(["auto", str(src), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    model = zoo.load(tmp_path / "out")
    torch.testing.assert_close(model.blocks[0].moe.router.weight, ema["blocks.0.moe.gate.weight"])
    torch.testing.assert_close(model.blocks[1].attn.proj.bias, ema["blocks.1.attn.out_proj.bias"])
    assert not torch.equal(model.blocks[1].attn.proj.bias, raw["blocks.1.attn.out_proj.bias"])
    # The allow-list is that one class, only while reading: other classes stay refused, and so does Namespace later.
    with pytest.raises(Exception, match="Namespace"):
        torch.load(src, weights_only=True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--classes", "5-3"], "the range '5-3' is empty"),
        (["--per-class", "0"], "--per-class must be >= 1, got 0"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
    ],
)
def test_sample_refuses_empty_requests(argv, message, capsys):
    from zoo.sample import main

    if argv[0] == "--classes":
        assert main(["--model", "dit_moe_tiny.digits", "--device", "cpu", *argv]) == 2
    else:
        with pytest.raises(SystemExit) as exit_:
            main(["--model", "dit_moe_tiny.digits", "--device", "cpu", *argv])
        assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("kw", [{}, {"capacity_factor": 1.0}, {"num_shared_experts": 1}, {"lora_rank": 2}])
def test_moe_layer_takes_zero_tokens(kw):
    from zoo.moe import MoE, MoEConfig

    moe = MoE(MoEConfig(hidden_size=8, expert_hidden_size=16, num_experts=4, top_k=2, **kw)).train()
    x = torch.randn(3, 0, 8, requires_grad=True)
    y = moe(x)
    assert y.shape == (3, 0, 8)
    assert moe.aux_loss is not None and float(moe.aux_loss.detach()) == 0.0
    (y.sum() + moe.aux_loss).backward()
    assert moe.router.weight.grad is not None and torch.count_nonzero(moe.router.weight.grad) == 0
    assert moe.last_stats.expert_load.tolist() == [0, 0, 0, 0] and moe.last_stats.drop_rate == 0.0
    moe.eval()
    assert moe(torch.randn(0, 8)).shape == (0, 8) and moe.aux_loss is None
