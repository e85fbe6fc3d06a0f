from __future__ import annotations

from tests.advice.fix_advice import shop
from tests.web.fix_web import fleet

__all__ = ["fleet", "shop"]
