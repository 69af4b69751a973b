import sys

from lib.planner import compiled

# Before the replay's modules are imported: a kept build of the compiled core runs in their place.
compiled.load()

from lib.planner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
