"""Prepare a dataset for fine-tuning: the same flags as `aift prepare` (run with --help for them).

python datasets/prepare_custom_dataset.py --model smollm2-135m-instruct --source json --source-path data/ja_qa.json
"""

import sys

from aift.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
