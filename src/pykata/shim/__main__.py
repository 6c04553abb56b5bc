import sys

from pykata.shim.cli import main

sys.exit(main())
