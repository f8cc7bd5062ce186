"""Official weights by name: `zoo.load("<arch>.official")` fetches the release through huggingface_hub, converts it
once and caches the converted directory. Tested offline only: a hub cache folder laid out as huggingface_hub lays it
out (models--org--name/refs/<ref> holding a commit, snapshots/<commit>/<file>) holds a tiny DiT-MoE checkpoint in the
official .pt layout, and HF_HUB_OFFLINE=1 keeps every call off the network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from zoo import registry

_spec = importlib.util.spec_from_file_location("dit_ckpt_helpers", Path(__file__).parent / "dit" / "test_checkpoints.py")
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)

REPO = "mmzoo-test/tiny-dit-moe"
FILE = "dit_moe_tiny_4E2A.pt"
NAME = "dit_tiny.hubtest"


def _release(seed: int) -> dict[str, torch.Tensor]:
    return _helpers.random_state(_helpers.official_dit_moe_shapes(2, 32, 2, 4, True, latent=8, classes=10), seed=seed)


def _hub_cache(home: Path, ref: str, commit: str, state: dict) -> None:
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.save({"ema": state}, snapshot / FILE)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("MMZOO_CACHE", raising=False)
    registry._ensure_registered()
    registry.register_weights("dit_tiny", "hubtest", registry.WeightsCfg(hf_hub_id=REPO, filename=FILE))
    yield tmp_path / "hf"
    registry._WEIGHTS.pop(NAME, None)


def test_official_name_fetches_converts_and_caches(hub):
    main, v1 = _release(seed=1), _release(seed=2)
    _hub_cache(hub, "main", "a" * 40, main)
    _hub_cache(hub, "v1", "b" * 40, v1)

    model = registry.load(NAME)
    torch.testing.assert_close(model.blocks[0].moe.router.weight, main["blocks.0.moe.gate.weight"])
    torch.testing.assert_close(model.blocks[1].attn.proj.bias, main["blocks.1.attn.out_proj.bias"])
    converted = hub / "mmzoo" / "converted" / NAME / ("a" * 40)
    assert registry.is_zoo_checkpoint(converted)
    assert not list(converted.parent.glob(".*.tmp"))  # the temporary conversion folder is gone

    # A revision names another commit of the same repository, converted into its own directory.
    other = registry.load(NAME, revision="v1", dtype="bf16")
    assert other.blocks[1].attn.proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(other.blocks[1].attn.proj.bias.float(), v1["blocks.1.attn.out_proj.bias"],
                               atol=1e-2, rtol=1e-2)  # fmt: skip

    # Later loads read the converted cache: the release file itself is no longer needed.
    (hub / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("a" * 40) / FILE).unlink()
    again = registry.load(NAME)
    torch.testing.assert_close(again.blocks[0].moe.router.weight, main["blocks.0.moe.gate.weight"])


def test_offline_without_the_release_in_the_cache_says_so(hub):
    with pytest.raises(FileNotFoundError, match=r"dit_tiny\.hubtest.*HF_HUB_OFFLINE is set.*not in the hub cache"):
        registry.load(NAME)
    assert not (hub / "mmzoo").exists()


def test_mmzoo_cache_moves_the_converted_directory(hub, tmp_path, monkeypatch):
    _hub_cache(hub, "main", "c" * 40, _release(seed=3))
    monkeypatch.setenv("MMZOO_CACHE", str(tmp_path / "converted_here"))
    registry.load(NAME)
    assert registry.is_zoo_checkpoint(tmp_path / "converted_here" / "converted" / NAME / ("c" * 40))
