import sys

from pretune.cli import main

sys.exit(main())
