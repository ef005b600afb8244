"""`vod keys list` and `vod keys revoke`: API keys beside `vod keys create` (issue 11)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_key_parsers(ksub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Adds the key actions beyond `create` to the `vod keys` sub-parsers."""
