"""tierbase: copy-on-write branches of a real PostgreSQL, self-hosted.

``from tierbase import Tierbase`` works as ever, but the facade (psycopg, the whole control plane) is
imported on first use only: the CLI, which talks HTTP, must start in tens of milliseconds.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Tierbase", "TierbaseError", "__version__"]

TYPE_CHECKING = False  # not typing's: importing typing costs `tierbase --version` a tenth of its time
if TYPE_CHECKING:
    from typing import Any

    from .app import Tierbase
    from .errors import TierbaseError


def __getattr__(name: str) -> Any:
    if name == "Tierbase":
        from .app import Tierbase

        return Tierbase
    if name == "TierbaseError":
        from .errors import TierbaseError

        return TierbaseError
    raise AttributeError(f"module 'tierbase' has no attribute {name!r}")
