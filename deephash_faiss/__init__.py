"""deephash-faiss: image retrieval with learned binary hash codes (Lin et al., CVPRW 2015).

Pipeline: ``data`` (find and decode images) -> ``model`` (CNN + latent layer H) ->
``train`` (softmax fine-tuning) -> ``extract`` (codes and fc7 features) -> ``store``
(HDF5 shards + manifest) -> ``index`` (FAISS binary index) -> ``search`` (BCS, HDS, ES)
with ``rerank`` (L2 over candidate pools) and ``metrics`` (the paper's protocol).

The high-level entry points live in :mod:`deephash_faiss.api`.
"""

__version__ = "0.1.0"

import os as _os

# torch and faiss each bring an OpenMP pool; with both loaded, spinning idle threads of one
# starve the other: on the 2-core machine a one-query BCS over 50,000 codes took 28 ms instead
# of 0.35 ms, while CPU encoding was not slower with passive waiting (issue 15). Read when the
# OpenMP runtimes load, i.e. before torch or faiss is imported; a value the user set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import DhfError  # noqa: E402

__all__ = ["DhfError", "__version__"]
