"""deephash-faiss: image retrieval with learned binary hash codes (Lin et al., CVPRW 2015).

Pipeline: ``data`` (find and decode images) -> ``model`` (CNN + latent layer H) ->
``train`` (softmax fine-tuning) -> ``extract`` (codes and fc7 features) -> ``store``
(HDF5 shards + manifest) -> ``index`` (FAISS binary index) -> ``search`` (BCS, HDS, ES)
with ``rerank`` (L2 over candidate pools) and ``metrics`` (the paper's protocol).

The high-level entry points live in :mod:`deephash_faiss.api`.
"""

__version__ = "0.1.0"

from .errors import DhfError  # noqa: E402

__all__ = ["DhfError", "__version__"]
