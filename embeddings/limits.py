"""Limits shared by the library and the command line, in a module that imports nothing
(the CLI reads them while parsing, before any image library is loaded)."""

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; real photos are far below this
