import sys

from lib.planner.cli import main

if __name__ == "__main__":
    sys.exit(main())
