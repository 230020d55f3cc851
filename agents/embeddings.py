"""Text embeddings for the Search agent: WordLlama's 256-dimension ``l2_supercat`` model (PyPI
``wordllama``), whose weights and tokenizer ship inside the wheel, so nothing is ever downloaded.

    embedder = load_embedder()                    # once per process (cached)
    vectors = embedder.embed(["pump bearing overheating", ...])   # float32 (n, 256), unit rows

WordLlama's own lookup of the files in its package is misspelt (it looks for the tokenizer under
``tokenizer/``, the folder is ``tokenizers/``) and, failing it, downloads from the Hugging Face hub;
``load_embedder`` points its cache at the package folder, where both files are, and disables the
download, so a missing file is an error instead of a network call.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import wordllama
from wordllama import WordLlama
from wordllama.inference import WordLlamaInference

MODEL = "l2_supercat"
DIM = 256


class Embedder:
    """Embeds texts as float32 rows of length ``dim``, each L2-normalised, so that the dot product
    of two rows is their cosine similarity. A text with no known token (e.g. "") embeds as the
    zero row, which is similar to nothing (cosine 0)."""

    def __init__(self, model: WordLlamaInference):
        self._model = model
        self.dim = int(model.embedding.shape[1])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = np.asarray(self._model.embed(list(texts), norm=False), dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        # Dividing by a zero norm would give NaNs that poison every later comparison.
        return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


@lru_cache(maxsize=1)
def load_embedder() -> Embedder:
    """The process's embedder (loaded once: a 16 MB table of token vectors). Raises
    FileNotFoundError naming the file when the installed ``wordllama`` lacks its bundled model."""
    package = Path(wordllama.__file__).parent
    return Embedder(WordLlama.load(MODEL, cache_dir=package, dim=DIM, disable_download=True))
