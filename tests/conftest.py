from __future__ import annotations

# The fixture plugins are modules next to this file, named "tests.fix_*" when
# tests/ is a package (it has an __init__.py) and "fix_*" when pytest puts
# tests/ itself on sys.path instead: work either way.
_prefix = f"{__package__}." if __package__ else ""

pytest_plugins = [f"{_prefix}fix_clusters", f"{_prefix}fix_repository", f"{_prefix}fix_daemon"]
