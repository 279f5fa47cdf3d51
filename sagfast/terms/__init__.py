"""The guidance terms and CFG rules, one file each; the registry the rest of sagfast reads.

Every module of this folder is imported here, and each `Term` or `CFGRule` subclass registers itself
when its module is (`base.TERMS`, `cfg.RULES`): adding a term is adding its file (docs/adding-a-term.md).
`SETTINGS` are all their configuration fields, in the order SAGConfig lists them.
"""

from __future__ import annotations

import importlib
import pkgutil

from sagfast.terms.base import TERMS
from sagfast.terms.cfg import RULES

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

SETTINGS = tuple(setting for owner in (*TERMS, *RULES.values()) for setting in owner.settings)

__all__ = ["RULES", "SETTINGS", "TERMS"]
