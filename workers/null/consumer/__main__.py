import sys

from workers.null.consumer.cli import main

sys.exit(main())
