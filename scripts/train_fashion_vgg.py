"""The name the shipped fashion-vgg weights record: now scripts/train_bundled.py --model fashion-vgg."""

import sys

from train_bundled import main

if __name__ == "__main__":
    main(["--model", "fashion-vgg", *sys.argv[1:]])
