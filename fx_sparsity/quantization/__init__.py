"""Weight-only quantization, alone or with pruning: int8 per output channel, int4 per group of columns.

* :mod:`.spec`: :class:`QuantSpec` (the grid; ``QuantSpec.parse("int4-g128-zp")``) and
  :class:`QuantizedWeight` (int8-stored values, float32 scales, zero points);
* :mod:`.rtn`: round-to-nearest, :func:`quantize_weight` and :func:`dequantize`, and the grid math
  the others share;
* :mod:`.gptq`: :func:`gptq_quantize`, GPTQ's error compensation from input Hessians, masks kept;
* :mod:`.quantizer`: :func:`quantize`, the flow on a prepared module (masks kept, weights replaced
  by their dequantized values, a record per weight: :func:`get_quantization`).

Pruning and quantizing in one pass is SparseGPT's joint mode: ``SparseGPTSparsifier(quantization="int8")``
(its math: :func:`fx_sparsity.sparsifier.sparsegpt.obs.sparsegpt_quantize`); the grid values and scales
it writes are kept per weight on the prepared module: :func:`get_quantization` (a :class:`QuantRecord` each).

The math modules import nothing of fx_sparsity but each other, so the sparsifiers can use them;
:func:`quantize` (which calibrates, so imports the sparsifiers' stages) is loaded on first use.

Example::

    >>> from fx_sparsity.quantization import QuantSpec, dequantize, quantize_weight
    >>> q = quantize_weight(torch.tensor([[0.5, -1.0, 0.0, 0.25]]), QuantSpec(8))
    >>> q.values.tolist(), dequantize(q)[0, 2].item()
    ([[64, -127, 0, 32]], 0.0)
"""

from typing import Any

from fx_sparsity.meta import QuantRecord, get_quantization
from fx_sparsity.quantization.gptq import gptq_quantize
from fx_sparsity.quantization.rtn import dequantize, quantize_weight
from fx_sparsity.quantization.spec import GROUP_SIZES, QuantizedWeight, QuantSpec, as_spec, check_fits

__all__ = [
    "QuantSpec",
    "QuantizedWeight",
    "GROUP_SIZES",
    "as_spec",
    "check_fits",
    "quantize_weight",
    "dequantize",
    "gptq_quantize",
    "QuantRecord",
    "get_quantization",
    "quantize",
]


def __getattr__(name: str) -> Any:
    # quantize calibrates: it imports fx_sparsity.calibration, which imports the sparsifiers, whose SparseGPT
    # imports the math above; loading it on first use keeps that chain from circling back here.
    if name == "quantize":
        from fx_sparsity.quantization.quantizer import quantize

        return quantize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
