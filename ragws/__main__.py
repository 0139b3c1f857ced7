import sys

from ragws.cli import main

sys.exit(main())
