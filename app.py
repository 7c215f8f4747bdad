"""diffkit's Gradio demo: ``python app.py [--model PATH_OR_ID] [--device cpu] [--host 127.0.0.1] [--port 7860]``.

See ``python app.py --help`` and docs/app.md; the code lives in :mod:`diffkit.app`.
"""

import sys

from diffkit.app.main import main

if __name__ == "__main__":
    sys.exit(main())
