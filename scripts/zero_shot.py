"""Zero-shot classification, side by side: the same as the `vlmoe-zeroshot` console script.

    python scripts/zero_shot.py --model runs/limoe/last.ckpt --model runs/clip/last.ckpt \
        --data 'data/digits/test-000000.tar' --classnames digits --templates digits
"""
from vlmoe.cli import zeroshot_main

if __name__ == "__main__":
    zeroshot_main()
