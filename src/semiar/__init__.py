"""semiar: lossless speculative and semi-autoregressive decoding.

    >>> import semiar                                                     # doctest: +SKIP
    >>> semiar.generate("def fib(n):", model="smollm2-135m-instruct", method="pld").text  # doctest: +SKIP
"""

from .api import ImageResult, Result, Session, generate, generate_images, save_image_grid, stream
from .engine import Engine, Generation, Stats
from .errors import SemiarError
from .models.loading import LoadedModel, load_model
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["generate", "stream", "Session", "Result", "generate_images", "save_image_grid", "ImageResult", "Engine", "Generation", "Stats", "SemiarError", "load_model",
           "LoadedModel", "SamplingParams", "__version__"]
