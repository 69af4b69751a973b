import sys

from lib.bench.measure import main

sys.exit(main())
