import sys

from cogprobe.cli import main

sys.exit(main())
