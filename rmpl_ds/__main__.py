import sys

from rmpl_ds.cli import main

sys.exit(main())
