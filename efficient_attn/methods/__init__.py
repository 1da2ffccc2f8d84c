"""Attention families, one file each.

Every module in this package is imported here (the ``dense`` reference first,
then the others alphabetically), which runs its ``@register_method``
decorators: adding a variant is adding a file.
"""

import importlib
import pkgutil

_names = sorted(m.name for m in pkgutil.iter_modules(__path__))
for _name in ["dense", *(n for n in _names if n != "dense")]:
    importlib.import_module(f"{__name__}.{_name}")
