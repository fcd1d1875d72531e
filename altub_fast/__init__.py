"""altub_fast: fused Triton kernels for normalizing-flow anomaly detection with AltUB.

``import altub_fast`` never touches the Triton driver: kernels are imported lazily, on first use.
"""
from . import functional, reference
from .nn import AllInOneBlock, FlowOutput, InvertibleModule, LearnableGaussian, SequenceINN

__version__ = "0.1.0"
__all__ = ["AllInOneBlock", "SequenceINN", "LearnableGaussian", "InvertibleModule", "FlowOutput",
           "functional", "reference", "__version__"]
