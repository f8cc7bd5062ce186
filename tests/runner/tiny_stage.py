"""A tiny regression stage type for runner tests: an MLP learns a fixed random linear map from seeded samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from zoo.recipe import InputPath
from zoo.registry import list_models, register_model
from zoo.stages import register_stage
from zoo.stages.base import StageModule


class TinyMLP(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 16, dropout: float = 0.1):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)  # exercises the per-step RNG reseeding on resume

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


if "runner_tiny_mlp" not in list_models():
    register_model(lambda **kw: TinyMLP(**kw), name="runner_tiny_mlp")


class Regression(Dataset):
    def __init__(self, n: int, dim: int, seed: int, noise: float):
        g = torch.Generator().manual_seed(seed)
        target = torch.Generator().manual_seed(1234)
        self.w = torch.randn(dim, dim, generator=target) / dim**0.5
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ self.w.T + noise * torch.randn(n, dim, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


@dataclass(kw_only=True)
class TinyModelConfig:
    dim: int = 8
    hidden: int = 16
    dropout: float = 0.1


@dataclass(kw_only=True)
class TinyDataConfig:
    num_samples: int = 64
    noise: float = 0.01
    notes_file: InputPath | None = None  # only here so tests can check missing-file errors


@dataclass(kw_only=True)
class TinyEvalConfig:
    num_samples: int = 32


@register_stage("runner_tiny_regression")
class TinyRegressionStage(StageModule):
    ModelConfig = TinyModelConfig
    DataConfig = TinyDataConfig
    EvalConfig = TinyEvalConfig

    def __init__(self, model_cfg, data_cfg, eval_cfg, stage):
        super().__init__(model_cfg, data_cfg, eval_cfg, stage)
        self.architecture = "runner_tiny_mlp"
        self.model_args = {"dim": model_cfg.dim, "hidden": model_cfg.hidden, "dropout": model_cfg.dropout}
        self.model = TinyMLP(**self.model_args)

    def train_dataset(self) -> Dataset:
        return Regression(self.data_cfg.num_samples, self.model_cfg.dim, seed=0, noise=self.data_cfg.noise)

    def compute_loss(self, batch):
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        return loss, {"abs_err": (self.model(x) - y).abs().mean()}

    def evaluate(self, out_dir: Path) -> dict[str, float]:
        data = Regression(self.eval_cfg.num_samples, self.model_cfg.dim, seed=99, noise=0.0)
        mse = nn.functional.mse_loss(self.model(data.x), data.y)
        weight_sum = sum(float(p.double().sum()) for p in self.model.parameters())
        return {"eval_mse": float(mse), "weight_sum": weight_sum}


@dataclass(kw_only=True)
class TinyLengthDataConfig(TinyDataConfig):
    reports_sample_lengths = True  # a class attribute, not a field (no annotation): the recipe validator reads it


@register_stage("runner_tiny_lengths")
class TinyLengthStage(TinyRegressionStage):
    """The regression stage with made-up sample lengths, so a recipe may group its batches by length."""

    DataConfig = TinyLengthDataConfig

    def sample_lengths(self) -> list[int]:
        return [(7 * i) % 13 for i in range(self.data_cfg.num_samples)]
