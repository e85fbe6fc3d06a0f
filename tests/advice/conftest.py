from __future__ import annotations

from tests.advice.fix_advice import shop

__all__ = ["shop"]
