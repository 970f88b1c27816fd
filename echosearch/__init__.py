"""echosearch: embedding search and longitudinal patient tracking for echocardiography archives."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
