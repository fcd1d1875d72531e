from ._freia_compat import FREIA_AVAILABLE, InputShapeError, InvertibleModule, set_state_dict_layout
from .allinone import AllInOneBlock
from .base import LearnableGaussian
from .sequence import FlowOutput, Inverse, SequenceINN

__all__ = ["AllInOneBlock", "InvertibleModule", "LearnableGaussian", "FlowOutput", "SequenceINN", "Inverse",
           "InputShapeError", "set_state_dict_layout", "FREIA_AVAILABLE"]
