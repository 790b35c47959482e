"""Progress bars with rate and ETA, silent for scripts (``--quiet``) and when not attached to a terminal."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(total: int | None = None, desc: str = "", unit: str = "it", quiet: bool = False, **kw) -> tqdm:
    """A tqdm bar; ``quiet=True`` disables it. Use as a context manager and call ``update(n)``."""
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True, file=sys.stderr,
                smoothing=0.1, mininterval=0.5, **kw)
