"""StackWise: layer-wise masked-diffusion training of Llama-style Transformers."""

from stackwise.errors import StackWiseError

__version__ = "0.1.0"
__all__ = ["StackWiseError", "__version__"]
