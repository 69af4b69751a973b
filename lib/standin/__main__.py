import sys

from .autoscaler import main

sys.exit(main())
