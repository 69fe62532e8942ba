"""Applications built on the library, beside the CLI: the demo and the paper comparison
(``demo``, ``paper`` and their runners and reports) and run results (``results``).

Nothing here is imported by ``import sparta``; the library below never imports this room.
"""
