import sys

from apical.cli import main

sys.exit(main())
