import sys

from bertjob.cli import main

sys.exit(main())
