import sys

from pivotseg.cli.main import main

sys.exit(main())
