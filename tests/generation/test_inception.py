"""The Inception feature path from a local weights file: same features as torchmetrics' own Inception module
(torch-fidelity's TF-compatible network) on the same uint8 images, and clear errors instead of downloads.

Real FID weights are not available offline, so the file holds random weights in the official key layout (built
from torchvision's Inception-v3, whose state-dict keys match torch-fidelity's FID network): the numbers are
meaningless, the code path is the real one."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch_fidelity")
torchvision = pytest.importorskip("torchvision")

from torchmetrics.image.fid import NoTrainInceptionV3  # noqa: E402

from eval.generation.grid import to_uint8  # noqa: E402
from eval.generation.inception import InceptionExtractor  # noqa: E402


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=1008
    )
    for (
        m
    ) in net.modules():  # He init keeps activations O(1) through 40+ layers (the default init shrinks them)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def test_features_match_torchmetrics_inception(weights_file) -> None:
    before = torch.get_num_threads()
    ex = InceptionExtractor(weights_file)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1  # grey digits-sized samples in [-1, 1]
    feats, logits = ex(images)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert feats.abs().sum() > 0
    ref_net = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights_file),
        antialias=False,
    )  # fmt: skip
    ref = ref_net(to_uint8(images).expand(-1, 3, -1, -1).contiguous())
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6)
    assert torch.get_num_threads() == before


def test_missing_or_foreign_weights_are_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads"):
        InceptionExtractor(tmp_path / "absent.pth")
    bad = tmp_path / "not_inception.pth"
    torch.save({"weight": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="not an Inception-v3 FID state dict"):
        InceptionExtractor(bad)
