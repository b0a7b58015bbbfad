"""tierbase: copy-on-write branches of a real PostgreSQL, self-hosted."""

from .app import Tierbase
from .errors import TierbaseError

__version__ = "0.1.0"
__all__ = ["Tierbase", "TierbaseError", "__version__"]
