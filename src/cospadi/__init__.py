"""cospadi: training-free compression of causal LMs with calibration-guided sparse
dictionaries (CoSpaDi) and the low-rank baselines it is measured against."""
from .api import calibration_ids, compress, evaluation_ids, perplexity_on_texts
from .checkpoint import load, save
from .data import load_corpus
from .errors import CospadiError
from .evaluate import perplexity
from .models import load_model
from .report import CompressionReport

__all__ = ["calibration_ids", "compress", "CompressionReport", "CospadiError", "evaluation_ids", "load",
           "load_corpus", "load_model", "perplexity", "perplexity_on_texts", "save"]
__version__ = "0.1.0"
