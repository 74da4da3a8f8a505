"""cospadi: training-free compression of causal LMs with calibration-guided sparse
dictionaries (CoSpaDi) and the low-rank baselines it is measured against."""
from .api import calibration_ids, compress, evaluation_ids, perplexity_on_texts
from .data import load_corpus
from .errors import CospadiError
from .evaluation.perplexity import perplexity
from .models import load_model
from .report import CompressionReport
from .storage import quantizer  # noqa: F401  registers the "cospadi" quantizer with transformers
from .storage.checkpoint import load, save, to_storage

__all__ = ["calibration_ids", "compress", "CompressionReport", "CospadiError", "evaluation_ids", "load",
           "load_corpus", "load_model", "perplexity", "perplexity_on_texts", "save", "to_storage"]
__version__ = "0.1.0"
