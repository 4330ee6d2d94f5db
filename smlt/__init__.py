"""smlt: train PyTorch models data-parallel on serverless functions.

The public API is re-exported here; see README.md for a tour.
"""

from __future__ import annotations

from smlt import errors

__all__ = ["errors"]
__version__ = "0.1.0"
