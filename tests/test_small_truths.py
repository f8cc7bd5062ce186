"""Small things a new user checks first: version, `python -m zoo`, help texts, README usage, default weights,
shipped configs without build paths, the model's own image preprocessing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zoo import cli

ROOT = Path(__file__).resolve().parents[1]


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_version_and_python_dash_m(capsys):
    import zoo

    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"mmzoo {zoo.__version__}"
    out = subprocess.run([sys.executable, "-m", "zoo", "list", "dit_moe_*"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()  # fmt: skip
    assert "dit_moe_tiny" in out


def test_help_texts_have_no_raw_double_backticks_and_chat_shows_examples(capsys):
    commands = [[], ["train"], ["list"], ["eval"], ["chat"], ["sample"], ["convert"], ["convert", "dit"]]
    texts = {" ".join(c) or "zoo": _help(capsys, c) for c in commands}
    for name, text in texts.items():
        assert "``" not in text, name
    assert "examples:" in texts["chat"] and 'zoo chat --scene test:3 "Is there a red star' in texts["chat"]
    assert "--model_args" in texts["eval"] and "--print-config" in texts["train"]


def test_readme_convert_usage_matches_the_cli(capsys):
    from zoo.convert import list_converters

    usage = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("zoo convert ")]
    named = {w for line in usage for w in re.split(r"[\s{},]+", line.split("#")[0])}
    assert set(list_converters()) <= named, usage  # dit included
    assert any(line.startswith("zoo convert dit ARCH SRC.pt OUT") for line in usage)
    assert "ARCH" in _help(capsys, ["convert", "dit"]).upper()


def test_pretrained_true_picks_the_default_weights():
    from zoo import registry

    assert registry.default_weights("digit_cnn") == "digit_cnn.digits"
    assert registry.default_weights("moe_llava_phi2_4e") == "moe_llava_phi2_4e.official"
    model = registry.create_model("digit_cnn", pretrained=True)
    reference = registry.load("digit_cnn.digits")
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(KeyError, match="has no registered weights"):
        registry.create_model("dit_s_2", pretrained=True)


def test_shipped_configs_carry_no_absolute_paths():
    def strings(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str):
            yield value

    configs = sorted((ROOT / "zoo" / "weights").glob("*/config.json"))
    assert len(configs) == 5
    for config in configs:
        absolute = [s for s in strings(json.loads(config.read_text())) if s.startswith("/") or re.match(r"[A-Z]:\\", s)]
        assert not absolute, f"{config}: {absolute}"


def test_the_model_carries_its_image_preprocessing():
    import zoo
    from data.shapes import ShapesWorld, WorldConfig

    model = zoo.load("moe_llava_tiny.shapes")
    image = ShapesWorld(WorldConfig(image_size=64)).scene(0, split="test").image
    pixels = model.preprocess(image)
    assert pixels.shape == (3, 64, 64)
    inputs = model.build_generation_inputs([image], ["What color?"])
    assert (inputs["pixel_values"][0] == pixels).all()  # exactly what generate feeds the tower


def test_zoo_chat_keeps_the_conversation_until_reset(monkeypatch, capsys):
    import io

    import zoo
    from zoo.chat import main
    from zoo.conversation import get_template

    class Recorder:
        template = get_template("phi_nosystem")

        def __init__(self):
            self.prompts, self.applied = [], []

        def generate(self, images, prompts, max_new_tokens=16, apply_template=True, **gen):
            self.prompts += prompts
            self.applied.append(apply_template)
            return [f"answer{len(self.prompts)}"]

    model = Recorder()
    monkeypatch.setattr(zoo.registry, "load", lambda name, **kw: model)
    monkeypatch.setattr("sys.stdin", io.StringIO("what color?\nhow many?\n/reset\nwhat shape?\n"))
    assert main(["--scene", "test:0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split() == ["answer1", "answer2", "answer3"]
    first, second, third = model.prompts
    assert model.applied == [False] * 3  # the conversation is rendered here, with the model's template
    assert first == model.template.prompt("<image>\nwhat color?")
    assert second.startswith(first) and "answer1" in second and second.count("<image>") == 1
    assert third == model.template.prompt("<image>\nwhat shape?")  # /reset: a new conversation, image again
