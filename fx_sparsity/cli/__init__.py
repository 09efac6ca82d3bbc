"""The ``fx-sparsity`` command line (:mod:`.command`) and its built-in models (:mod:`.demo_models`)."""

from fx_sparsity.cli.command import EXIT_FAIL, EXIT_OK, EXIT_USAGE, build_parser, main
from fx_sparsity.cli.demo_models import DemoNet, load_model

__all__ = [
    "EXIT_FAIL",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "main",
    "DemoNet",
    "load_model",
]
