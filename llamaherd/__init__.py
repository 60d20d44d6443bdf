"""llamaherd: the Llama family of language models, and the stack around it, in one package."""

from .api import Model
from .checkpoint import load
from .config import ModelConfig, RopeScaling

__all__ = ["Model", "ModelConfig", "RopeScaling", "load"]
__version__ = "0.1.0"
