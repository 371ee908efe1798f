"""`python -m fdpo ...` (and `accelerate launch -m fdpo train RECIPE`).

`python -m` puts the working directory first on `sys.path`, so a stray `./trl.py` or `./yaml.py` would
shadow the modules fdpo imports. It is taken off before anything else is imported; user reward modules
named in a recipe are still found in the working directory, explicitly (`fdpo.rewards.registry`).
"""

import os
import sys

if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from fdpo.cli import main  # after the sys.path fix above, on purpose

if __name__ == "__main__":
    main()
