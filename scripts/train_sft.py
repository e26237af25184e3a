"""Supervised fine-tuning from the command line: exactly the arguments of `aift train`.

    python scripts/train_sft.py --model-name smollm2-135m-instruct --dataset-path data/prepared/ja_qa \
        --output-dir outputs/sft --use-lora --lora-r 16 --num-epochs 1
"""

import sys

from aift.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
