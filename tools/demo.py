#!/usr/bin/env python3
"""Run the demo without installing the console script: python tools/demo.py [options]."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from shmpool.demo import main

if __name__ == "__main__":
    sys.exit(main())
