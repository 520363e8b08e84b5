"""Names that become file names (encoders, columns, heads, stages): kept boring.

A light module (no third-party import), so the command line can check names while
parsing the config without loading the store.
"""

from __future__ import annotations

import re

from .errors import InputError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def check_name(name: str, what: str) -> str:
    """``name`` if it is safe as a file name component, else InputError."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InputError(f"{what} {name!r} is not a valid name: use letters, digits and "
                         "_ . + - (no slashes, no '..', at most 128 characters)")
    return name
