"""Optional dependencies: import them, or say which extra of the package installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

DISTRIBUTION = "inference-safeguard"


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def import_extra(module: str, *, extra: str, needed_by: str) -> ModuleType:
    """Import `module`, an optional dependency that `extra` installs.

    Args:
        module: the module to import, e.g. `"rich.table"`.
        extra: the extra of `inference-safeguard` that installs it, e.g. `"eval"`.
        needed_by: what needs it, for the message (e.g. `"safeguard eval"`).

    Raises:
        MissingExtraError: the module's distribution is not installed (an ImportError
            raised from inside an installed module is not caught).
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top_level = module.partition(".")[0]
        if error.name is None or error.name.partition(".")[0] != top_level:
            raise
        raise MissingExtraError(
            f"{needed_by} needs {top_level!r}, which is not installed; install it with "
            f'`pip install "{DISTRIBUTION}[{extra}]"`'
        ) from error
