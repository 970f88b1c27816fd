import sys

from echosearch.cli import main

sys.exit(main())
