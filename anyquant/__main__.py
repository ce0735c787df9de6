import sys

from anyquant.cli.main import main

sys.exit(main())
