"""diffkit's Gradio demo: ``python app.py [--model PATH_OR_ID] [--device cpu] [--host 127.0.0.1] [--port 7860]``.

See ``python app.py --help`` and docs/app.md; the code lives in :mod:`diffkit.app`.
"""

import os
import sys

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. An erase job and a generation
# run at once in this process; with spinning threads on a small CPU one generation took 21 s instead of
# 0.6 s (2 cores, loaded machine); with PASSIVE it takes 1.1 s while the job trains.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from diffkit.app.main import main  # noqa: E402 - after the environment above

if __name__ == "__main__":
    sys.exit(main())
