import sys

from codraft.cli import main

sys.exit(main())
