"""Attention families, one file each.

Every module in this package is imported here, which runs its
``@register_method`` decorators: adding a variant is adding a file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
