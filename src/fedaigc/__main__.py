import sys

from fedaigc.cli import main

sys.exit(main())
