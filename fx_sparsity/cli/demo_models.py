"""The built-in demo model of the CLI, and model loading for ``--model``."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DemoNet", "load_model"]


class DemoNet(nn.Module):
    """A small CNN exercising every form the passes handle.

    Convs called as modules (one with ``padding_mode="reflect"``), a Linear
    called twice (one weight, two uses), a Linear whose weight is tied to
    another Linear's, and a functional ``F.linear`` on a bare parameter.
    Input: ``[N, 3, 32, 32]``; output: ``[N, 10]``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, padding_mode="reflect")
        self.proj = nn.Linear(32, 64)
        self.mix = nn.Linear(64, 64)
        self.mix_t = nn.Linear(64, 64, bias=False)
        self.mix_t.weight = self.mix.weight
        self.head_weight = nn.Parameter(torch.randn(10, 64) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.mean(dim=(2, 3))
        x = F.relu(self.proj(x))
        x = F.relu(self.mix(x))
        x = F.relu(self.mix(x))
        x = self.mix_t(x)
        return F.linear(x, self.head_weight)


def _load_torchvision(name: str) -> nn.Module:
    try:
        import torchvision.models
    except Exception as e:  # a CUDA-only torchvision fails with RuntimeError, not ImportError
        raise ValueError(
            f"--model torchvision:{name} needs a working torchvision matching torch {torch.__version__} "
            f"(import failed: {type(e).__name__}: {e}); install it or use a file.py:ClassName model"
        ) from e
    try:
        return torchvision.models.get_model(name, weights=None)
    except ValueError as e:
        raise ValueError(f"torchvision has no model {name!r}: {e}") from e


def _load_from_file(path: str, class_name: str) -> nn.Module:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--model {path}:{class_name}: no such file {path!r}")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"--model {path}:{class_name}: {path} defines no nn.Module class {class_name!r}")
    return cls()


def _load_transformers(path: str) -> nn.Module:
    """A transformers causal LM from a local folder (``save_pretrained``'s: config.json and weights), or randomly
    initialised from a config (a ``.json`` file, or a folder holding config.json and no weights); its cache off
    (the CLI runs whole sequences; the files are only read)."""
    target = Path(path)
    config_file = target if target.is_file() else target / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--model hf:{path}: no config.json in {str(target)!r}; give a folder that "
                         "save_pretrained wrote, or a config.json (nothing is downloaded)")
    try:
        import transformers
    except ImportError:
        raise ValueError(f"--model hf:{path} needs transformers: pip install transformers") from None
    weights = target.is_dir() and any(f.suffix in (".safetensors", ".bin") for f in target.iterdir())
    try:
        if not weights:
            config = transformers.AutoConfig.from_pretrained(config_file, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_config(config)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(target, local_files_only=True)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--model hf:{path}: transformers could not load it as a causal LM ({first})") from None
    model.config.use_cache = False
    return model


def load_model(spec: str) -> nn.Module:
    """Build a model from ``"demo"``, ``"torchvision:<name>"``, ``"hf:<folder>"`` or ``"path/file.py:ClassName"``.

    Models are randomly initialised, except a transformers folder's, which holds its weights; nothing is
    downloaded.
    """
    if spec == "demo":
        return DemoNet()
    if spec.startswith("torchvision:"):
        return _load_torchvision(spec.split(":", 1)[1])
    if spec.startswith("hf:"):
        return _load_transformers(spec.split(":", 1)[1])
    path, sep, class_name = spec.rpartition(":")
    if sep and path.endswith(".py") and class_name:
        return _load_from_file(path, class_name)
    raise ValueError(f"--model must be 'demo', 'torchvision:<name>', 'hf:<folder>' or 'file.py:ClassName', got {spec!r}")
