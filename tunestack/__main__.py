import sys

from tunestack.cli import main

sys.exit(main())
