from __future__ import annotations

from tests.web.fix_web import fleet

__all__ = ["fleet"]
