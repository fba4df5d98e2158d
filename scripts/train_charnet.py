"""The name the shipped charnet weights record: now scripts/train_bundled.py --model charnet."""

import sys

from train_bundled import main

if __name__ == "__main__":
    main(["--model", "charnet", *sys.argv[1:]])
