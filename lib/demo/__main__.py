import sys

from lib.demo.cli import main

sys.exit(main())
