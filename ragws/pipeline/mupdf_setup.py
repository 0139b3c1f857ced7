"""How the server process imports pymupdf: without the ``pymupdf-layout`` analyser.

pymupdf ≥ 2 imports ``pymupdf.layout`` whenever that separate package is installed (a
benchmark peer installs it beside ragws), which loads an ONNX model at import and reroutes
some of pymupdf's own functions through it. Its licence is non-commercial, and ragws has its
own layout model, so a server process never loads it: the import is refused before pymupdf
is first imported. Library users of ragws's modules are left alone; only ``ragws serve`` (and
the processes it starts) call this.
"""

from __future__ import annotations

import os
import sys


def keep_layout_analyzer_out() -> None:
    """Make ``import pymupdf.layout`` fail in this process (pymupdf then runs without it).

    Must run before pymupdf is first imported; later, the analyser is already active and only
    :mod:`ragws.pipeline.tables`'s explicit ``use_layout=False`` keeps it out of the table
    finder."""
    if "pymupdf" not in sys.modules:
        sys.modules.setdefault("pymupdf.layout", None)  # type: ignore[assignment]
    # ... and pymupdf's advice to install it, printed at the first table search, stays unsaid.
    os.environ.setdefault("PYMUPDF_SUGGEST_LAYOUT_ANALYZER", "0")
