from .allinone import AllInOneBlock, InvertibleModule
from .base import LearnableGaussian
from .sequence import FlowOutput, SequenceINN

__all__ = ["AllInOneBlock", "InvertibleModule", "LearnableGaussian", "FlowOutput", "SequenceINN"]
