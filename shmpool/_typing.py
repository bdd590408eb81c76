"""Array types the public signatures use, spelled once (numpy's generic
``ndarray`` needs its type arguments under ``mypy --strict`` with the numpy
releases that still support Python 3.10)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

#: Handles: int64, one per element.
Handles = npt.NDArray[np.int64]
#: A view of an element, of any dtype.
Array = npt.NDArray[Any]
