"""``python -m archalign``: the command line.

``python -m`` puts the current directory first on ``sys.path``; it is taken off again before the
command runs, so that factories import from installed packages only, as with the installed
``archalign`` command (``--import-path .`` imports from the current directory on purpose).
Python itself has imported archalign and torch by then: to keep even those from the current
directory, run the ``archalign`` command (or ``python -P -m archalign``, Python 3.11+).
"""

import os
import sys

if not getattr(sys.flags, "safe_path", False) and sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from .cli import main

sys.exit(main())
