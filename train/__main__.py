"""python -m train PRESET [--field value ...]"""

import sys

from tools.train import main

sys.exit(main())
