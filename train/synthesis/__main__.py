"""``python -m train.synthesis --out DIR [key=value ...]``: the synthesis recipe's CLI (``--help`` lists the stages)."""

import sys

from train.synthesis.recipe import main

if __name__ == "__main__":
    sys.exit(main())
