import sys

from lib.standin.autoscaler import main

sys.exit(main())
