import sys

from minicpm4.cli import main

sys.exit(main())
