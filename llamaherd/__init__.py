"""llamaherd: the Llama family of language models, and the stack around it, in one package."""

from .api import Model, load, resolve
from .config import ModelConfig, RopeScaling
from .tokenizer import Tokenizer

__all__ = ["Model", "ModelConfig", "RopeScaling", "Tokenizer", "load", "resolve"]
__version__ = "0.1.0"
