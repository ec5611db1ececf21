"""Write the attack resources as PNGs: resource/badnet/trigger_image.png, resource/blended/pattern.png.

    python resource/make_resources.py [--size 32]

The images come from utils/triggers.py (deterministic; nothing is downloaded), so the attack scripts do not need
these files; they are for inspection and for BackdoorBench itself (its badnet `patch_mask_path`, its blended
`attack_trigger_img_path`). The blended pattern is a seeded smooth colour texture: an 8x8 grid of uniform random
RGB values (numpy default_rng, seed 20240501) upsampled bilinearly to the image size.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone tool beside the resources

from utils.attack_record import save_png
from utils.triggers import badnet_trigger_image, blended_pattern


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    for name, image in (("badnet/trigger_image.png", badnet_trigger_image(args.size, args.size, 3)),
                        ("blended/pattern.png", blended_pattern(args.size, args.size, 3))):
        (here / name).parent.mkdir(parents=True, exist_ok=True)
        save_png(here / name, image)
        print(f"wrote {here / name}")


if __name__ == "__main__":
    main()
