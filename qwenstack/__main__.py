import sys

from qwenstack.cli import main

sys.exit(main())
