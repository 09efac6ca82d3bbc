"""The ``fx-sparsity`` command line."""

from fx_sparsity.cli.demo_models import (
    DemoNet,
    load_model,
)
from fx_sparsity.cli.command import (
    main,
    build_parser,
    EXIT_OK,
    EXIT_FAIL,
    EXIT_USAGE,
)

__all__ = [
    "DemoNet",
    "load_model",
    "main",
    "build_parser",
    "EXIT_OK",
    "EXIT_FAIL",
    "EXIT_USAGE",
]
