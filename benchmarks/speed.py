"""Speed benchmark (issue 4); the code lives in ``apical.bench.speed`` so that
``apical bench speed`` runs the same thing. Usage: ``python benchmarks/speed.py [--quick] [--device cuda]``."""

import sys

from apical.bench.speed import main

if __name__ == "__main__":
    sys.exit(main())
